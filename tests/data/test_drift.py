"""Drift checks (`monitoring/drift.py`) on the real engagement features: no drift between random
halves of one data set, drift when a fifth of the features shift by half a standard deviation, at
1,000 and 100,000 rows; the report and the MLflow monitoring run; bad inputs named."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from contentml import events, registry
from feature_repo.niche_schema import FEATURES, KEYS, TARGETS
from monitoring.drift import (
    TEXT_STATS,
    DriftConfig,
    DriftError,
    DriftMethod,
    check_drift,
    model_columns,
    read_window,
    reference_from_frame,
    run_drift_check,
)
from tests.conftest import DATA_DIR, make_settings, run_cli
from tests.helpers.events import published
from tests.helpers.registry import cli
from training.data import load_youtube_trending
from training.niche.data import engagement_frame

SHIFTED = list(FEATURES)[::5]
"""A fifth of the features (continuous, binary and discrete ones), shifted in the drift tests."""


@pytest.fixture(scope="module")
def engagement() -> pd.DataFrame:
    """The real engagement rows (about 4,100): keys, `FEATURES`, targets."""
    return engagement_frame(load_youtube_trending(DATA_DIR))


@pytest.fixture(scope="module")
def large(engagement: pd.DataFrame) -> pd.DataFrame:
    """200,000 rows bootstrapped from the real features, continuous ones with a little noise
    (1 % of their standard deviation) so that values do not simply repeat."""
    rng = np.random.default_rng(7)
    features = engagement[list(FEATURES)]
    frame = features.iloc[rng.integers(0, len(features), 200_000)].reset_index(drop=True)
    for column in FEATURES:
        if features[column].nunique() > 10:
            noise = rng.normal(0.0, 0.01 * features[column].std(), len(frame))
            frame[column] = frame[column] + noise
    return frame


def halves(frame: pd.DataFrame, rows: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two disjoint random windows of `rows` rows each."""
    order = np.random.default_rng(seed).permutation(len(frame))[: 2 * rows]
    return frame.iloc[order[:rows]], frame.iloc[order[rows:]].copy()


def shifted(reference: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    current = current.copy()
    for column in SHIFTED:
        current[column] = current[column] + 0.5 * reference[column].std()
    return current


@pytest.fixture(scope="module")
def checks(engagement, large):
    """`check(rows, shift)`: the drift check of two random windows of `rows` rows (the real
    features at 1,000 rows, the bootstrapped ones at 100,000), the current one with `SHIFTED`
    moved by half a standard deviation when `shift`; each computed once per module."""
    done = {}

    def check(rows: int, shift: bool):
        if (rows, shift) not in done:
            source = engagement[list(FEATURES)] if rows <= len(engagement) // 2 else large
            reference, current = halves(source, rows, seed=rows)
            current = shifted(reference, current) if shift else current
            done[rows, shift] = check_drift(reference, current, list(FEATURES))
        return done[rows, shift]

    return check


@pytest.mark.parametrize(("rows", "method"), [(1_000, "ks"), (100_000, "wasserstein")])
def test_random_halves_do_not_drift(checks, rows, method):
    result = checks(rows, shift=False)
    assert not result.drifted
    assert result.drift_share <= 0.1
    assert {f.method for f in result.features.values()} == {method}
    if rows == 100_000:
        assert result.drift_share == 0.0
        # The distances' noise at this size is far under the 0.1 threshold.
        assert max(f.score for f in result.features.values()) < 0.03
    else:
        # A test at p < 0.01 on 20 columns may flag one by chance; "drifted" needs three.
        assert sum(f.drifted for f in result.features.values()) <= 1


@pytest.mark.parametrize("rows", [1_000, 100_000])
def test_half_a_standard_deviation_on_a_fifth_of_the_features_drifts(checks, rows):
    result = checks(rows, shift=True)
    assert result.drifted
    assert {c for c, f in result.features.items() if f.drifted} == set(SHIFTED)
    assert result.drift_share == pytest.approx(len(SHIFTED) / len(FEATURES))
    scores = [result.features[c].score for c in SHIFTED]
    if rows == 1_000:
        assert max(scores) < 1e-10  # KS p-values, threshold 0.01
    else:
        assert min(scores) > 0.4  # normed Wasserstein distances, threshold 0.1


def test_verdicts_agree_with_evidently_count_and_report(checks, tmp_path):
    result = checks(1_000, shift=True)
    counts = [
        r
        for r in result.snapshot.metric_results.values()
        if r.metric_value_location.metric.params["type"].endswith("DriftedColumnsCount")
    ]
    assert counts[0].share.value == pytest.approx(result.drift_share)
    result.snapshot.save_html(str(tmp_path / "report.html"))
    html = (tmp_path / "report.html").read_text()
    assert "title_chars" in html and "Dataset Drift is detected" in html


def test_share_exactly_at_the_threshold_is_not_drift(engagement, tmp_path):
    # 1 of 10 columns drifting is 10 %: the rule is "more than 10 %".
    columns = list(FEATURES)[:10]
    reference, current = halves(engagement[columns], 1_000, seed=4)
    current[columns[0]] = current[columns[0]] + 0.5 * reference[columns[0]].std()
    result = check_drift(reference, current, columns)
    assert result.drift_share == pytest.approx(0.1)
    assert not result.drifted
    result.snapshot.save_html(str(tmp_path / "report.html"))  # the report says the same
    assert "Dataset Drift is NOT detected" in (tmp_path / "report.html").read_text()


def test_categorical_columns_by_size(engagement):
    def moved(frame: pd.DataFrame) -> pd.DataFrame:
        # A third of the rows turned to the most common category.
        frame = frame.copy()
        top = engagement["category"].value_counts().index[0]
        frame.loc[frame.index[: len(frame) // 3], "category"] = top
        return frame

    reference, current = halves(engagement[["category", "country"]], 1_000, seed=5)
    small = check_drift(reference, current, ["category", "country"])
    assert {f.method for f in small.features.values()} == {"psi"}
    assert not small.drifted
    assert check_drift(reference, moved(current), ["category"]).drifted

    rng = np.random.default_rng(5)
    rows = rng.integers(0, len(engagement), 20_000)
    big = engagement[["category"]].iloc[rows].reset_index(drop=True)
    reference, current = big.iloc[:10_000], big.iloc[10_000:]
    result = check_drift(reference, current, ["category"])
    assert result.features["category"].method == "jensenshannon"
    assert not result.drifted
    assert check_drift(reference, moved(current), ["category"]).drifted


def test_without_columns_compares_the_shared_comparable_ones(engagement):
    # The keys, two features and the targets (the current window lacks `like_rate`).
    frame = engagement[[*KEYS, *list(FEATURES)[:2], *TARGETS]]
    reference, current = halves(frame, 1_000, seed=6)
    result = check_drift(reference, current.drop(columns=["like_rate"]), None)
    assert list(result.features) == [
        "country",
        "category_id",
        "category",
        *list(FEATURES)[:2],
        "log_views_gained",
    ]
    assert set(result.skipped) == {"video_id", "channel_id", "title", "event_timestamp"}
    assert "distinct values" in result.skipped["video_id"]
    assert "datetime" in result.skipped["event_timestamp"]


def test_per_column_method_and_config_validation(engagement):
    reference, current = halves(engagement[list(FEATURES)], 1_000, seed=8)
    config = DriftConfig(per_column={"title_chars": DriftMethod("psi", 0.2)})
    result = check_drift(reference, current, ["title_chars", "tag_count"], config)
    assert result.features["title_chars"].method == "psi"
    assert result.features["title_chars"].threshold == 0.2
    assert result.features["tag_count"].method == "ks"

    with pytest.raises(DriftError, match="drift_share"):
        DriftConfig(drift_share=1.5)
    with pytest.raises(DriftError, match="'ks' for categorical"):
        DriftConfig(large_categorical=DriftMethod("ks", 0.05))
    with pytest.raises(DriftError, match="no method 'nope'"):
        DriftConfig(per_column={"x": DriftMethod("nope", 0.1)})
    with pytest.raises(DriftError, match="threshold"):
        DriftMethod("ks", 0.0)


@pytest.mark.parametrize(
    ("reference", "current", "columns", "message"),
    [
        (pd.DataFrame(), pd.DataFrame({"a": [1.0]}), None, "reference window is empty"),
        (pd.DataFrame({"a": [1.0]}), pd.DataFrame({"b": [1.0]}), None, "no column to compare"),
        (
            pd.DataFrame({"a": [1.0]}),
            pd.DataFrame({"a": [1.0]}),
            ["a", "b"],
            r"no column\(s\) \['b'\]",
        ),
        (
            pd.DataFrame({"a": [1.0]}),
            pd.DataFrame({"a": ["x"]}),
            ["a"],
            "numerical in the reference",
        ),
        (
            pd.DataFrame({"a": [1.0]}),
            pd.DataFrame({"a": [np.nan]}),
            ["a"],
            "no values in the current",
        ),
        (
            pd.DataFrame({"t": pd.to_datetime(["2024-01-01"])}),
            pd.DataFrame({"t": pd.to_datetime(["2024-01-02"])}),
            ["t"],
            "neither numerical nor categorical",
        ),
    ],
)
def test_bad_windows_are_named(reference, current, columns, message):
    with pytest.raises(DriftError, match=message):
        check_drift(reference, current, columns)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(DriftError, match="file not found"):
        read_window(tmp_path / "missing.csv")
    with pytest.raises(DriftError, match="unknown file type '.txt'"):
        read_window(tmp_path / "window.txt")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DriftError, match="not a readable parquet file"):
        read_window(tmp_path / "broken.parquet")
    (tmp_path / "empty.csv").write_text("a,b\n")
    with pytest.raises(DriftError, match="no rows"):
        read_window(tmp_path / "empty.csv")


def test_model_columns():
    assert model_columns("niche-global") == list(FEATURES)
    assert model_columns("niche") == list(FEATURES)
    assert model_columns("quality") == list(TEXT_STATS)
    with pytest.raises(DriftError, match="known: niche, niche-\\*, quality"):
        model_columns("trend")


def test_reference_from_frame(engagement):
    reference = reference_from_frame(engagement, list(FEATURES), max_rows=500)
    assert list(reference.columns) == list(FEATURES) and len(reference) == 500
    assert reference.equals(reference_from_frame(engagement, list(FEATURES), max_rows=500))
    with pytest.raises(DriftError, match="no column"):
        reference_from_frame(engagement, ["nope"])


def _artifacts(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, "drift")}


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    """One MLflow database for the module: creating one takes seconds."""
    return make_settings(tmp_path_factory.mktemp("drift") / "state")


def test_run_drift_check_logs_a_monitoring_run(engagement, settings, tmp_path):
    reference, current = halves(engagement, 1_000, seed=9)
    reference.to_parquet(tmp_path / "reference.parquet")
    shifted(reference, current).to_csv(tmp_path / "current.csv", index=False)

    events.configure(settings)
    answer = run_drift_check(
        settings, tmp_path / "reference.parquet", tmp_path / "current.csv", model="niche-global"
    )
    assert json.loads(json.dumps(answer)) == answer  # what the CLI prints
    (alert,) = [e.data for e in published(settings) if e.kind == "alert.drift"]
    drifted = [name for name, column in answer["features"].items() if column["drifted"]]
    assert alert == {
        "model": "niche-global", "drift_share": answer["drift_share"], "drifted_columns": drifted,
        "threshold": 0.1, "run_id": answer["run_id"],
    }  # fmt: skip
    assert answer["drifted"] and answer["drift_share"] == pytest.approx(0.2)
    assert list(answer["features"]) == list(FEATURES)
    assert set(answer["features"]["title_chars"]) == {"method", "score", "threshold", "drifted"}
    report = Path(answer["report"])
    assert report.is_file() and report.parent == settings.home / "monitoring"

    client = registry.connect(settings)
    run = client.get_run(answer["run_id"])
    assert run.info.run_name == "drift-niche-global"
    assert run.info.experiment_id == registry.experiment_id(client, settings)
    assert run.data.metrics["drift_share"] == pytest.approx(0.2)
    assert run.data.metrics["drifted_features"] == 4
    assert run.data.params["model"] == "niche-global"
    assert _artifacts(client, run.info.run_id) == {"drift/features.json", f"drift/{report.name}"}
    logged = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/drift/features.json"))
    assert logged["features"] == answer["features"]

    # Without a model: every shared comparable column; CSV both sides; a chosen output folder.
    columns = ["video_id", "category", "event_timestamp", *list(FEATURES)[:3]]
    reference[columns].to_csv(tmp_path / "reference.csv", index=False)
    current[columns].to_csv(tmp_path / "current.csv", index=False)
    answer = run_drift_check(
        settings, tmp_path / "reference.csv", tmp_path / "current.csv", output_dir=tmp_path / "out"
    )
    assert list(answer["features"]) == ["category", *list(FEATURES)[:3]]
    assert set(answer["skipped"]) == {"video_id", "event_timestamp"}
    assert "dates" in answer["skipped"]["event_timestamp"]  # read back from CSV as text
    assert Path(answer["report"]).parent == tmp_path / "out"
    assert client.get_run(answer["run_id"]).info.run_name == "drift-shared-columns"


def test_quality_compares_text_statistics(settings, tmp_path):
    tweets = pd.read_csv(DATA_DIR / "toxicity" / "train.csv", nrows=2_000)
    tweets.iloc[:1_000].to_csv(tmp_path / "reference.csv", index=False)
    tweets.iloc[1_000:].to_csv(tmp_path / "tweets.csv", index=False)
    titles = pd.read_csv(DATA_DIR / "youtube-trending" / "USvideos.csv", nrows=1_000)
    titles[["video_id", "title"]].to_csv(tmp_path / "titles.csv", index=False)

    same = run_drift_check(settings, tmp_path / "reference.csv", tmp_path / "tweets.csv", "quality")
    assert list(same["features"]) == list(TEXT_STATS)
    assert not same["drifted"]
    other = run_drift_check(
        settings, tmp_path / "reference.csv", tmp_path / "titles.csv", "quality"
    )
    assert other["drifted"]


@pytest.mark.slow
def test_the_cli_prints_the_contract_and_exits_0_either_way(
    engagement, tmp_path, monkeypatch, capsys
):
    """A drifted window in a child process, as a user runs it; the window that does not drift
    and a missing file through `main()` in this process, whose drift code is loaded."""
    reference, current = halves(engagement[list(FEATURES)], 1_000, seed=3)
    reference_csv, current_file = tmp_path / "reference.csv", tmp_path / "current.parquet"
    reference.to_csv(reference_csv, index=False)
    current.to_parquet(current_file)
    shifted(reference, current).to_parquet(tmp_path / "shifted.parquet")
    home = tmp_path / "state"
    check = ["drift", "check", "--model", "niche-music", "--reference", str(reference_csv)]
    run = run_cli(home, *check, "--current", str(tmp_path / "shifted.parquet"), "--json")
    assert run.returncode == 0, run.stderr
    shifted_result = json.loads(run.stdout)

    settings = make_settings(home)
    status, out, _ = cli(
        settings, monkeypatch, capsys, *check, "--current", str(current_file), "--json"
    )
    assert status == 0
    current_result = json.loads(out)
    for result in (shifted_result, current_result):
        assert set(result) == {"drift_share", "drifted", "features", "report"}
        assert Path(result["report"]).is_file()
    assert not current_result["drifted"]
    assert shifted_result["drifted"] and shifted_result["drift_share"] >= 0.2
    status, _, err = cli(
        settings, monkeypatch, capsys, "drift", "check", "--reference", "nope.csv", "--current", "x"
    )
    assert status == 2 and "nope.csv" in err
