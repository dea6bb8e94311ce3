"""Quality classifier: the toxicity data, the split, the recipe, calibration, the gate's
decision table, and the behaviour of a tiny fine-tuned MiniLM (code, data and model tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.special import log_softmax, softmax
from sklearn.metrics import f1_score, recall_score

from contentml import registry
from tests.conftest import make_settings
from tests.helpers.quality import (
    CLEAN,
    TINY_RECIPE,
    TOXICITY_CSV,
    sample_toxicity,
    write_csv,
)
from training.data import TOXICITY_CLASSES, DataError, load_texts, load_toxicity
from training.quality import classifier
from training.quality.calibration import (
    HATE,
    Calibration,
    expected_calibration_error,
    fit_hate_threshold,
    fit_stacker,
    fit_temperature,
    fixed_blend,
    hate_recall_and_weighted_f1,
    hate_then_argmax,
)
from training.quality.config import ConfigError, QualityConfig, load_config
from training.quality.ensemble import ENCODER_COLUMNS, Members
from training.quality.gate import Decision, GateThresholds, decide
from training.quality.policy import Check, Finding, Severity
from training.quality.pyfunc import PROBABILITY_COLUMNS
from training.quality.split import Split, fold_of, split, split_of
from training.quality.steps import GATE_METRIC
from training.quality.train import (
    View,
    evaluate,
    evaluate_views,
    log_saved_model,
    predict_frame,
    train,
    training_rows,
)

NEITHER = TOXICITY_CLASSES.index("neither")


def most_offensive_tweets(count: int) -> list[str]:
    """The tweets most annotators called hate speech or offensive."""
    raw = pd.read_csv(TOXICITY_CSV, dtype=str, keep_default_na=False)
    votes = raw["hate_speech"].astype(int) + raw["offensive_language"].astype(int)
    return raw.assign(votes=votes).nlargest(count, "votes")["tweet"].tolist()


# --- data -----------------------------------------------------------------------------------


def test_the_real_toxicity_file_loads_clean():
    frame = load_toxicity(TOXICITY_CSV)
    assert list(frame.columns) == ["id", "text", "label"]
    assert len(frame) == 21_212
    assert frame["id"].is_unique
    assert (frame["text"].str.strip() != "").all()
    shares = frame["label"].value_counts(normalize=True)
    assert set(shares.index) == {0, 1, 2}
    # Davidson et al.: ~6 % hate speech, ~74 % offensive, ~20 % neither.
    assert 0.04 < shares[0] < 0.08 and 0.7 < shares[1] < 0.8 and 0.15 < shares[2] < 0.25


HEADER = ["", "count", "class", "tweet"]


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([["", "count", "tweet"], ["1", "3", "hello"]], "needs a 'class' column"),
        ([HEADER, ["1", "3", "1", "hi"], ["2", "3", "3", "there"]], "data row 2 has '3'"),
        ([HEADER, ["1", "3", "", "hi"]], "data row 1 has ''"),
        ([HEADER, ["1", "3", "hate", "hi"]], "data row 1 has 'hate'"),
        ([["", "count", "class", "body"], ["1", "3", "1", "hi"]], "needs a column named one of"),
        ([["tweet", "class"], ["hi", "1"]], "first column must be an id"),
        ([HEADER, ["7", "3", "1", "hi"], ["7", "3", "2", "there"]], "ids in the first column"),
    ],
)
def test_load_toxicity_rejects_bad_files(tmp_path: Path, rows, problem):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=problem) as error:
        load_toxicity(path)
    assert str(path) in str(error.value)


def test_load_toxicity_rejects_a_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match="file not found"):
        load_toxicity(tmp_path / "nothing.csv")


def test_load_toxicity_drops_blank_texts_and_keeps_ids_as_text(tmp_path: Path):
    path = write_csv(
        tmp_path / "t.csv",
        [HEADER, ["007", "3", " 2", "fine"], ["010", "3", "0", "  "], ["3", "3", "1", "bad"]],
    )
    frame = load_toxicity(path)
    assert frame["id"].tolist() == ["007", "3"]
    assert frame["label"].tolist() == [2, 1]
    assert frame["label"].dtype == "int64"


def test_load_texts_keeps_the_first_column_header_and_ids_exactly(tmp_path: Path):
    texts = load_texts(TOXICITY_CSV)
    assert list(texts.columns) == ["", "text"]
    assert texts.iloc[0].tolist() == ["13932", "Omfg. The crazy bitch is here&#128557;&#128584;"]
    assert len(texts) == 21_212

    path = write_csv(tmp_path / "t.csv", [["video_id", "text"], ["007", "hi"], ["010", ""]])
    texts = load_texts(path)
    assert list(texts.columns) == ["video_id", "text"]
    assert texts.values.tolist() == [["007", "hi"], ["010", ""]]


def test_load_texts_prefers_tweet_then_text_then_title(tmp_path: Path):
    path = write_csv(tmp_path / "t.csv", [["id", "title", "text"], ["1", "a title", "a text"]])
    assert load_texts(path)["text"].tolist() == ["a text"]


# --- split ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toxicity() -> pd.DataFrame:
    return load_toxicity(TOXICITY_CSV)


def test_split_of_is_stable_for_an_id():
    # Pinned: changing the hash would move evaluation rows of past versions into training.
    assert split_of("13932") is Split.EVALUATION
    assert split_of("6") is Split.EVALUATION
    assert split_of("11714") is Split.TRAIN
    assert all(split_of(str(i)) == split_of(str(i)) for i in range(100))
    assert (fold_of("11714", 3), fold_of("13932", 3)) == (2, 0)


def test_splits_are_disjoint_and_roughly_80_20(toxicity: pd.DataFrame):
    parts = split(toxicity)
    ids = {s: set(part["id"]) for s, part in parts.items()}
    assert sum(len(i) for i in ids.values()) == len(toxicity)
    assert set.union(*ids.values()) == set(toxicity["id"])
    assert not ids[Split.EVALUATION] & ids[Split.TRAIN]
    shares = {s: len(i) / len(toxicity) for s, i in ids.items()}
    assert shares[Split.TRAIN] == pytest.approx(0.8, abs=0.015)
    assert shares[Split.EVALUATION] == pytest.approx(0.2, abs=0.015)


def test_folds_share_the_training_split_evenly_and_independently_of_the_slice(
    toxicity: pd.DataFrame,
):
    training = split(toxicity)[Split.TRAIN]
    folds = training["id"].map(lambda i: fold_of(i, 3))
    assert folds.value_counts(normalize=True).to_numpy() == pytest.approx([1 / 3] * 3, abs=0.02)
    # Each fold keeps the class balance: the hash knows nothing of the labels.
    hate = training.groupby(folds)["label"].apply(lambda labels: (labels == HATE).mean())
    assert hate.to_numpy() == pytest.approx([(training["label"] == HATE).mean()] * 3, abs=0.01)


@pytest.mark.parametrize("max_train_rows", [300, 2])
def test_a_capped_training_split_keeps_every_reviewed_row(
    toxicity: pd.DataFrame, max_train_rows: int
):
    reviewed = [i for i in (f"review-item{n}-0" for n in range(40)) if split_of(i) == Split.TRAIN]
    decisions = pd.DataFrame({"id": reviewed[:5], "text": "a decision", "label": HATE})
    frame = pd.concat([toxicity, decisions], ignore_index=True)
    rows = training_rows(frame, QualityConfig(max_train_rows=max_train_rows))
    assert set(decisions["id"]) <= set(rows["id"])
    # Over the cap, the decisions alone; under it, a sample that keeps every class beside them.
    assert len(rows) == pytest.approx(max(max_train_rows, 5), abs=3)
    assert set(rows["label"]) == ({0, 1, 2} if max_train_rows > 5 else {HATE})
    assert (
        training_rows(frame, QualityConfig())["id"].tolist()
        == split(frame)[Split.TRAIN]["id"].tolist()
    )


def test_split_does_not_move_rows_when_rows_are_added_or_reordered(toxicity: pd.DataFrame):
    subset = toxicity.sample(n=2_000, random_state=1)
    shuffled = toxicity.sample(frac=1.0, random_state=2)
    for s in Split:
        in_subset = set(split(subset)[s]["id"])
        in_all = set(split(shuffled)[s]["id"])
        assert in_subset == in_all & set(subset["id"])


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_length", 0),
        ("max_length", 513),
        ("batch_size", 0),
        ("epochs", 0),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-5),
        ("warmup_fraction", 1.5),
        ("hate_recall_target", -0.1),
        ("class_weight_power", 1.01),
        ("weight_decay", -0.01),
        ("max_train_rows", 0),
        ("folds", 1),
        ("blend_weight", 1.5),
    ],
)
def test_config_rejects_bad_values_naming_the_field(tmp_path: Path, field: str, value):
    with pytest.raises(ConfigError, match=field):
        QualityConfig(**{field: value})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({field: value}))
    with pytest.raises(ConfigError, match=field):
        load_config(recipe)


def test_config_accepts_the_edges_and_round_trips():
    edges = QualityConfig(max_length=512, warmup_fraction=0, hate_recall_target=1, epochs=1)
    assert QualityConfig(**edges.to_dict()) == edges


def test_load_config_names_an_unknown_field(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epoch: 3\nmax_length: 64\n")
    with pytest.raises(ConfigError, match=r"unknown recipe fields \['epoch'\]"):
        load_config(recipe)


def test_load_config_rejects_a_recipe_that_is_not_a_mapping(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- epochs\n- 3\n")
    with pytest.raises(ConfigError, match="mapping of QualityConfig fields"):
        load_config(recipe)


def test_load_config_applies_overrides_that_are_set(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    assert load_config(recipe, epochs=None) == QualityConfig(**TINY_RECIPE)
    assert load_config(recipe, epochs=4).epochs == 4
    assert load_config(None) == QualityConfig()


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("epochs: three", "epochs"),
        ("learning_rate: fast", "learning_rate"),
        ("epochs: 1.5", "epochs"),
    ],
)
def test_load_config_names_a_field_with_a_value_of_the_wrong_type(tmp_path: Path, line, field):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(ConfigError, match=field):
        load_config(recipe)


def test_load_config_reads_a_learning_rate_in_exponent_notation(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 5e-5\n")
    assert load_config(recipe).learning_rate == pytest.approx(5e-5)


# --- calibration ----------------------------------------------------------------------------


def sample_labels(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    draws = rng.random(len(probabilities))[:, None]
    return (draws > probabilities.cumsum(axis=1)).sum(axis=1).clip(max=probabilities.shape[1] - 1)


@pytest.fixture(scope="module")
def overconfident() -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels were drawn from softmax(logits / 2.5): 2.5 times too confident."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 4.0, size=(20_000, 3))
    return logits, sample_labels(softmax(logits / 2.5, axis=1), rng)


def test_fit_temperature_recovers_the_true_temperature(overconfident):
    logits, labels = overconfident
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)


def test_fit_temperature_is_one_for_calibrated_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, size=(20_000, 3))
    labels = sample_labels(softmax(logits, axis=1), rng)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)


def halves(labels: np.ndarray) -> np.ndarray:
    return np.arange(len(labels)) % 2


@pytest.mark.parametrize("columns", [slice(None), slice(0, 3)])
def test_the_stacker_lowers_the_expected_calibration_error(overconfident, columns):
    logits, labels = overconfident
    noise = np.random.default_rng(3).normal(size=logits.shape)
    features = np.hstack([log_softmax(logits, axis=1), noise])
    raw = expected_calibration_error(softmax(logits, axis=1), labels)
    stacker = fit_stacker(features, labels, halves(labels), 0.5, columns)
    calibrated = stacker.probabilities(features)
    after = expected_calibration_error(calibrated, labels)
    assert raw > 0.1
    assert after < 0.03 and after < raw / 3
    weights = np.asarray(stacker.weights)
    # The informative member carries the stacker; the noise gets (almost) nothing.
    assert np.abs(weights[:, 3:]).max() < 0.05
    # Softmax scores are defined up to a shift: what the data fixes is the spread of each
    # column's weights, 1 / 2.5 here (the labels' temperature).
    assert np.ptp(weights[:, :3], axis=0) == pytest.approx([1 / 2.5] * 3, rel=0.1)
    if columns != slice(None):
        assert (weights[:, 3:] == 0).all()


def test_the_fixed_blend_is_temperature_scaled(overconfident):
    logits, labels = overconfident
    features = np.hstack([log_softmax(logits, axis=1), log_softmax(logits, axis=1)])
    blend = fixed_blend(features, labels, 0.4, 0.5)
    assert np.asarray(blend.weights)[0, 0] == pytest.approx(0.6 / 2.5, rel=0.1)
    assert np.asarray(blend.weights)[0, 3] == pytest.approx(0.4 / 2.5, rel=0.1)
    calibrated = blend.probabilities(features)
    # Temperature scaling never changes which class ranks first.
    assert (calibrated.argmax(axis=1) == logits.argmax(axis=1)).all()
    assert expected_calibration_error(calibrated, labels) < 0.03


def test_expected_calibration_error_of_perfect_and_wrong_predictions():
    labels = np.array([0, 1, 2, 2])
    certain = np.eye(3)[labels]
    assert expected_calibration_error(certain, labels) == 0.0
    assert expected_calibration_error(certain, (labels + 1) % 3) == 1.0


@pytest.fixture(scope="module")
def hate_probabilities() -> tuple[np.ndarray, np.ndarray]:
    """10 % hate speech whose hate probability is modest (0.1-0.6); others score up to 0.3.
    Rounded to 0.01 so that the threshold search has few candidates to try."""
    rng = np.random.default_rng(2)
    labels = rng.choice(3, size=1_000, p=[0.1, 0.6, 0.3])
    hate = np.where(labels == HATE, rng.uniform(0.1, 0.6, 1_000), rng.uniform(0.0, 0.3, 1_000))
    hate = hate.round(2)
    rest = 1.0 - hate
    offensive = np.where(labels == 1, 0.8, np.where(labels == 2, 0.2, 0.5)) * rest
    probabilities = np.column_stack([hate, offensive, rest - offensive])
    return probabilities, labels


def hate_recall(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    predicted = hate_then_argmax(probabilities, threshold)
    return float((predicted[labels == HATE] == HATE).mean())


@pytest.mark.parametrize("seed", range(5))
def test_the_threshold_searchs_metrics_are_sklearns(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=300, p=[0.06, 0.77, 0.17])
    predicted = np.where(rng.random(300) < 0.7, labels, rng.choice(3, size=300))
    if seed == 0:
        predicted[predicted == HATE] = 1  # a class never predicted: its F1 is 0
    recall, f1 = hate_recall_and_weighted_f1(labels, predicted)
    assert recall == pytest.approx(recall_score(labels == HATE, predicted == HATE))
    assert f1 == pytest.approx(f1_score(labels, predicted, average="weighted", zero_division=0))


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_fit_hate_threshold_reaches_a_reachable_recall_target(hate_probabilities, target):
    probabilities, labels = hate_probabilities
    threshold = fit_hate_threshold(probabilities, labels, target)
    assert 0.05 <= threshold <= 0.8
    assert hate_recall(probabilities, labels, threshold) >= target


def test_a_higher_recall_target_never_raises_the_threshold(hate_probabilities):
    probabilities, labels = hate_probabilities
    thresholds = [fit_hate_threshold(probabilities, labels, t) for t in (0.3, 0.6, 0.9, 0.99)]
    assert thresholds == sorted(thresholds, reverse=True)


def test_an_unreachable_recall_target_gets_the_highest_recall(hate_probabilities):
    probabilities, labels = hate_probabilities
    probabilities = probabilities.copy()
    probabilities[np.flatnonzero(labels == HATE)[:5], HATE] = 0.01  # below every candidate
    threshold = fit_hate_threshold(probabilities, labels, 1.0)
    best = hate_recall(probabilities, labels, 0.05)
    assert best < 1.0
    assert hate_recall(probabilities, labels, threshold) == best


@pytest.mark.parametrize(
    ("probabilities", "threshold", "expected"),
    [
        ([0.30, 0.60, 0.10], 0.30, "hate_speech"),  # at the threshold
        ([0.29, 0.60, 0.11], 0.30, "offensive_language"),
        ([0.29, 0.20, 0.51], 0.30, "neither"),
        ([0.40, 0.35, 0.25], 0.50, "offensive_language"),  # likeliest, but under the threshold
        ([0.40, 0.25, 0.35], 0.50, "neither"),
        ([0.10, 0.10, 0.80], 0.05, "hate_speech"),
    ],
)
def test_classes_call_hate_at_the_threshold_else_the_likelier_other(
    probabilities, threshold, expected
):
    (code,) = hate_then_argmax(np.array([probabilities]), threshold)
    assert TOXICITY_CLASSES[code] == expected


def test_calibration_saves_and_loads(tmp_path: Path):
    calibration = Calibration(((1.5, 0.0), (0.0, 2.0), (0.1, 0.1)), (0.0, 0.2, -0.2), 0.23)
    assert Calibration.load(calibration.save(tmp_path / "c.json")) == calibration
    assert Calibration.from_dict(calibration.to_dict()) == calibration


# --- gate -----------------------------------------------------------------------------------

EMAIL = Finding(Check.PERSONAL_DATA, Severity.REJECT, "email address 'j***@example.com'")
LINK = Finding(Check.UNKNOWN_LINK, Severity.REVIEW, "link to unknown site 'example.org'")


@pytest.mark.parametrize(
    ("probabilities", "predicted", "findings", "decision", "checks"),
    [
        ([0.02, 0.03, 0.95], 2, [], Decision.PASS, []),
        ([0.05, 0.10, 0.85], 2, [], Decision.PASS, []),  # exactly the pass score
        ([0.10, 0.08, 0.82], 2, [], Decision.REVIEW, ["classifier"]),  # below the pass score
        ([0.05, 0.90, 0.05], 1, [], Decision.REJECT, ["classifier"]),  # sure and offensive
        ([0.85, 0.10, 0.05], 0, [], Decision.REJECT, ["classifier"]),  # sure and hateful
        ([0.30, 0.30, 0.40], 2, [], Decision.REVIEW, ["classifier"]),  # unsure
        ([0.40, 0.45, 0.15], 1, [], Decision.REVIEW, ["classifier"]),  # unsure, low score
        ([0.01, 0.01, 0.98], 2, [EMAIL], Decision.REJECT, ["personal_data"]),
        ([0.01, 0.01, 0.98], 2, [LINK], Decision.REVIEW, ["unknown_link"]),
        ([0.01, 0.01, 0.98], 2, [LINK, EMAIL], Decision.REJECT, ["unknown_link", "personal_data"]),
        ([0.14, 0.01, 0.85], 0, [], Decision.REVIEW, ["classifier"]),  # hate at a low threshold
        ([0.05, 0.90, 0.05], 1, [LINK], Decision.REJECT, ["unknown_link", "classifier"]),
    ],
)
def test_decide(probabilities, predicted, findings, decision, checks):
    verdict = decide(np.array(probabilities), predicted, findings)
    assert verdict.decision is decision
    assert [r["check"] for r in verdict.reasons] == checks
    assert verdict.score == probabilities[NEITHER]
    assert verdict.confidence == max(probabilities)
    assert verdict.labels == dict(zip(TOXICITY_CLASSES, probabilities, strict=True))


def test_verdict_explains_itself():
    verdict = decide(np.array([0.14, 0.01, 0.85]), 0, [EMAIL]).to_dict()
    assert verdict["decision"] == "reject" and verdict["class"] == 0
    assert verdict["reasons"][0] == {
        "check": "personal_data",
        "severity": "reject",
        "detail": "email address 'j***@example.com'",
    }
    assert verdict["reasons"][1]["severity"] == "review"
    assert "possible hate_speech" in verdict["reasons"][1]["detail"]


def test_decide_follows_custom_thresholds():
    strict = GateThresholds(pass_score=0.99)
    assert decide(np.array([0.02, 0.03, 0.95]), 2, [], strict).decision is Decision.REVIEW


# --- model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> pd.DataFrame:
    sample, _ = sample_toxicity(rows_per_class=400)
    path = tmp_path_factory.mktemp("toxicity") / "small.csv"
    sample.to_csv(path, index=False)
    return load_toxicity(path)


@pytest.fixture(scope="module")
def trained(frame: pd.DataFrame, tmp_path_factory, one_thread) -> tuple[Path, dict]:
    model_dir = tmp_path_factory.mktemp("quality") / "model"
    summary = train(frame, QualityConfig(**TINY_RECIPE), model_dir)
    return model_dir, summary


@pytest.fixture(scope="module")
def fitted(trained) -> tuple:
    model_dir, _ = trained
    return classifier.load_fitted(model_dir / "artifacts" / "classifier" / "fold_0")


LONG_CLEAN = CLEAN * 100  # 3,000 words


@pytest.mark.slow
def test_training_cross_fits_on_the_training_split_and_calibrates(trained):
    model_dir, summary = trained
    assert summary["train_rows"] == pytest.approx(TINY_RECIPE["max_train_rows"], abs=3)
    assert summary["folds"] == TINY_RECIPE["folds"]
    assert 0.05 <= summary["hate_threshold"] <= 0.8
    assert {"fold_1_epoch_0_val_f1", "fold_0_epoch_0_train_loss"} <= set(summary)
    assert 0.45 < summary["out_of_fold_weighted_f1"] <= 1.0
    folds = sorted(p.name for p in (model_dir / "artifacts" / "classifier").iterdir())
    assert folds == ["fold_0", "fold_1"]


@pytest.mark.slow
def test_saved_model_predicts_class_and_probabilities_per_text(trained):
    model_dir, _ = trained
    texts = pd.Series(["what a great video", "", "you are an idiot", LONG_CLEAN])
    predicted = predict_frame(str(model_dir), texts)
    assert list(predicted.columns) == ["class", *PROBABILITY_COLUMNS]
    assert len(predicted) == len(texts)
    probabilities = predicted[PROBABILITY_COLUMNS].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert set(predicted["class"]) <= {0, 1, 2}
    calibration = Calibration.load(model_dir / "artifacts" / "calibration.json")
    assert (predicted["class"].to_numpy() == calibration.classes(probabilities)).all()


@pytest.mark.slow
def test_fold_encoders_side_by_side_give_each_ones_own_log_probabilities(trained):
    model_dir, _ = trained
    artifacts = model_dir / "artifacts"
    members = Members.load(artifacts / "classifier", artifacts / "lexical.joblib")
    texts = ["you are an idiot", CLEAN * 10, "what a great video"]
    each = [
        log_softmax(classifier.predict_logits(model, tokenizer, texts), axis=1)
        for model, tokenizer in members.encoders
    ]
    assert len(each) == TINY_RECIPE["folds"]
    features = members.features(texts)
    np.testing.assert_allclose(features[:, ENCODER_COLUMNS], np.mean(each, axis=0), atol=1e-5)


@pytest.mark.slow
def test_a_text_scores_the_same_alone_and_in_any_batch(fitted):
    model, tokenizer = fitted
    texts = ["you are an idiot", CLEAN * 10, "", "what a great video", "Nice!!! &amp; thanks"]
    together = classifier.predict_logits(model, tokenizer, texts)
    backwards = classifier.predict_logits(model, tokenizer, texts[::-1])[::-1]
    alone = np.vstack([classifier.predict_logits(model, tokenizer, [t]) for t in texts])
    assert together.shape == (len(texts), len(TOXICITY_CLASSES))
    np.testing.assert_allclose(together, alone, atol=1e-4)
    np.testing.assert_allclose(backwards, alone, atol=1e-4)


@pytest.mark.slow
def test_an_offensive_passage_lowers_a_long_clean_text_score(trained):
    model_dir, _ = trained
    passage = " ".join(most_offensive_tweets(5))
    texts = pd.Series([LONG_CLEAN, LONG_CLEAN + passage, passage + " " + LONG_CLEAN])
    neither = predict_frame(str(model_dir), texts)["prob_neither"].to_numpy()
    assert neither[1] < neither[0] - 0.3
    assert neither[2] < neither[0] - 0.3


@pytest.mark.slow
def test_a_long_text_answers_with_its_most_toxic_window(fitted):
    model, tokenizer = fitted
    text = CLEAN * 100 + " ".join(most_offensive_tweets(5)) + " " + CLEAN * 100
    max_length = tokenizer.model_max_length
    assert max_length == TINY_RECIPE["max_length"]  # saved with the tokenizer
    windows = tokenizer(
        classifier.normalize(text),
        truncation=True,
        stride=max_length // 4,
        return_overflowing_tokens=True,
    )["input_ids"]
    assert len(windows) > classifier.INFERENCE_BATCH  # several forward passes
    assert all(len(w) <= max_length for w in windows)
    with torch.inference_mode():
        each = np.vstack([model(input_ids=torch.tensor([w])).logits.numpy() for w in windows])
    worst = each[log_softmax(each, axis=1)[:, NEITHER].argmin()]
    (answer,) = classifier.predict_logits(model, tokenizer, [text])
    np.testing.assert_allclose(answer, worst, atol=1e-4)
    # The worst window is not the first one: a truncating classifier would miss it.
    first = log_softmax(each[0])[NEITHER]
    assert log_softmax(answer)[NEITHER] < first


@pytest.mark.slow
def test_clean_sentences_score_higher_than_offensive_tweets(trained):
    model_dir, _ = trained
    clean = [CLEAN, "Thanks for watching, see you next week!", "How to fix a leaky faucet"]
    offensive = most_offensive_tweets(3)
    neither = predict_frame(str(model_dir), pd.Series(clean + offensive))["prob_neither"]
    assert neither.iloc[: len(clean)].min() > neither.iloc[len(clean) :].max()


@pytest.mark.slow
def test_evaluate_scores_the_fixed_evaluation_slice(trained, frame: pd.DataFrame):
    model_dir, _ = trained
    metrics = evaluate(str(model_dir), frame)
    assert metrics["rows"] == len(split(frame)[Split.EVALUATION])
    assert {GATE_METRIC, "accuracy", "ece", "hate_speech_recall", "neither_f1"} <= set(metrics)
    # Balanced classes: chance is ~0.33; the tiny model gets ~0.7.
    assert metrics[GATE_METRIC] > 0.45


@pytest.mark.slow
def test_evaluate_views_scores_the_model_and_its_ablations(trained, frame: pd.DataFrame):
    model_dir, _ = trained
    views = evaluate_views(str(model_dir), frame)
    assert list(views) == [view.value for view in View]
    served = evaluate(str(model_dir), frame)
    stacked = views[View.STACKED]
    assert stacked["thresholded"][GATE_METRIC] == pytest.approx(served[GATE_METRIC])
    assert stacked["thresholded"]["macro_f1"] == pytest.approx(served["macro_f1"])
    for view in views.values():
        assert 0.05 <= view["hate_threshold"] <= 0.8
        for scores in (view["thresholded"], view["argmax"]):
            assert scores["rows"] == len(split(frame)[Split.EVALUATION])
            assert 0.0 <= scores[GATE_METRIC] <= 1.0
    # Balanced classes: chance is ~0.33; only the served stack is held to a floor.
    assert stacked["thresholded"][GATE_METRIC] > 0.45


@pytest.fixture
def tracking(tmp_path: Path) -> Iterator[str]:
    """A fresh MLflow store in `tmp_path`; yields the experiment to log runs to (its artifact
    root is in `tmp_path` too, not MLflow's default `./mlruns`)."""
    settings = make_settings(tmp_path / "state")
    yield registry.experiment_id(registry.connect(settings), settings)


@pytest.mark.slow
def test_log_saved_model_registers_what_was_saved(trained, tracking, tmp_path: Path):
    import shutil

    import mlflow

    model_dir, _ = trained
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    (broken / "artifacts" / "calibration.json").unlink()
    with mlflow.start_run(experiment_id=tracking):
        with pytest.raises(FileNotFoundError, match="calibration.json"):
            log_saved_model(broken, "quality")
        info = log_saved_model(model_dir, "quality")
    texts = pd.Series(["what a great video", "you are an idiot"])
    registered = predict_frame(f"models:/quality/{info.registered_model_version}", texts)
    pd.testing.assert_frame_equal(registered, predict_frame(str(model_dir), texts))
