"""Train, save and evaluate the quality classifier: typed functions the CLI, the KFP
components and the tests call."""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from enum import StrEnum
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_fscore_support

from training.data import TOXICITY_CLASSES
from training.quality import ensemble
from training.quality.calibration import expected_calibration_error, fit_stacker, fixed_blend
from training.quality.config import QualityConfig
from training.quality.policy import DEFAULT_POLICY
from training.quality.split import REVIEW_ID_PREFIX, Split, fold_of, split

SCORER_CODE = Path(__file__).with_name("scorer_code.py")

# Pinned from the running environment so serving installs what training used.
SERVING_REQUIREMENTS = (
    "mlflow", "numpy", "pandas", "scipy", "scikit-learn", "torch", "transformers", "tokenizers",
    "safetensors", "pyyaml", "phonenumbers", "datasketch", "joblib",
)  # fmt: skip

CLASSIFIER_ARTIFACT = "classifier"
LEXICAL_ARTIFACT = "lexical"
CALIBRATION_ARTIFACT = "calibration"
ABLATIONS_ARTIFACT = "ablations"
POLICY_ARTIFACT = "policy"


class View(StrEnum):
    """The ways of turning the members' features into classes that `evaluate_views` scores:
    the served stacker and, as ablations, the parts it is made of."""

    STACKED = "stacked"  # served: stacker over encoder and lexical
    ENCODER = "encoder"  # the encoder's log-probabilities alone, recalibrated
    LEXICAL = "lexical"  # the lexical model's alone, recalibrated
    BLEND = "blend"  # the fixed blend (`blend_weight`) with a temperature: the earlier recipe


def training_rows(frame: pd.DataFrame, config: QualityConfig) -> pd.DataFrame:
    """The training split, or at most `max_train_rows` of it: every reviewed row (a person's
    decision is scarce and is what the next version should learn), then a sample of the rest,
    stratified so a small smoke run still sees every class."""
    training = split(frame)[Split.TRAIN]
    if config.max_train_rows is None or len(training) <= config.max_train_rows:
        return training
    reviewed = training["id"].str.startswith(REVIEW_ID_PREFIX)
    rest = training[~reviewed]
    room = max(config.max_train_rows - int(reviewed.sum()), 0)
    sampled = rest.groupby("label", group_keys=False).sample(
        frac=room / max(len(rest), 1), random_state=config.seed
    )
    return pd.concat([training[reviewed], sampled]).reset_index(drop=True)


def train(frame: pd.DataFrame, config: QualityConfig, model_dir: Path) -> dict[str, float]:
    """Cross-fit the members on the training split, stack and calibrate them on their
    out-of-fold predictions, and save an MLflow pyfunc in `model_dir`. Returns the per-fold
    epoch history and out-of-fold scores to log."""
    training = training_rows(frame, config)
    folds = training["id"].map(lambda row_id: fold_of(row_id, config.folds)).to_numpy()
    members, features, histories = ensemble.cross_fit(training, folds, config)
    labels = training["label"].to_numpy()
    target = config.hate_recall_target
    calibrations = {
        View.STACKED: fit_stacker(features, labels, folds, target),
        View.ENCODER: fit_stacker(features, labels, folds, target, ensemble.ENCODER_COLUMNS),
        View.LEXICAL: fit_stacker(features, labels, folds, target, ensemble.LEXICAL_COLUMNS),
        View.BLEND: fixed_blend(features, labels, config.blend_weight, target),
    }
    served = calibrations.pop(View.STACKED)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        encoders, words = members.save(scratch / CLASSIFIER_ARTIFACT, scratch / "lexical.joblib")
        ablations = scratch / "ablations.json"
        ablations.write_text(json.dumps({v.value: c.to_dict() for v, c in calibrations.items()}))
        artifacts = {
            CLASSIFIER_ARTIFACT: encoders,
            LEXICAL_ARTIFACT: words,
            CALIBRATION_ARTIFACT: served.save(scratch / "calibration.json"),
            ABLATIONS_ARTIFACT: ablations,
            POLICY_ARTIFACT: DEFAULT_POLICY,
        }
        example = pd.DataFrame({"text": ["what a great video", "subscribe for more"]})
        mlflow.pyfunc.save_model(str(model_dir), **pyfunc_arguments(artifacts, example))
    probabilities = served.probabilities(features)
    out_of_fold = scores(labels, served.classes(probabilities), probabilities)
    summary = {
        "train_rows": float(len(training)),
        "folds": float(config.folds),
        "hate_threshold": served.hate_threshold,
        **{f"out_of_fold_{name}": value for name, value in out_of_fold.items()},
    }
    for fold, epochs in enumerate(histories):
        for epoch, metrics in enumerate(epochs):
            summary |= {f"fold_{fold}_epoch_{epoch}_{k}": v for k, v in metrics.items()}
    return summary


def pyfunc_arguments(artifacts: dict[str, Path], input_example: pd.DataFrame) -> dict:
    """What `save_model` and `log_model` both need, so a saved and a logged model match."""
    return {
        "python_model": str(SCORER_CODE),
        "artifacts": {name: str(path) for name, path in artifacts.items()},
        "input_example": input_example,
        "pip_requirements": [
            f"{name}=={importlib.metadata.version(name)}" for name in SERVING_REQUIREMENTS
        ],
    }


def log_saved_model(model_dir: Path, registered_name: str) -> mlflow.models.model.ModelInfo:
    """Log a model saved by `train` to the active MLflow run and register it."""
    saved = mlflow.models.Model.load(str(model_dir))
    artifacts = model_dir / "artifacts"
    paths = {
        CLASSIFIER_ARTIFACT: artifacts / CLASSIFIER_ARTIFACT,
        LEXICAL_ARTIFACT: artifacts / "lexical.joblib",
        CALIBRATION_ARTIFACT: artifacts / "calibration.json",
        ABLATIONS_ARTIFACT: artifacts / "ablations.json",
        POLICY_ARTIFACT: artifacts / DEFAULT_POLICY.name,
    }
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a saved quality model: missing {missing}")
    return mlflow.pyfunc.log_model(
        name="model",
        registered_model_name=registered_name,
        **pyfunc_arguments(paths, saved.load_input_example(str(model_dir))),
    )


def predict_frame(model_uri: str, texts: pd.Series) -> pd.DataFrame:
    """`class` and the three calibrated probabilities for each text, from a saved or
    registered model."""
    model = mlflow.pyfunc.load_model(model_uri)
    return model.predict(pd.DataFrame({"text": texts.astype(str).tolist()}))


def scores(
    labels: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray
) -> dict[str, float]:
    """Weighted F1 (the gate's metric), macro F1, per-class precision/recall/F1, and
    calibration error."""
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=range(len(TOXICITY_CLASSES)), zero_division=0.0
    )
    result = {
        "weighted_f1": float(f1_score(labels, predicted, average="weighted")),
        "macro_f1": float(f1_score(labels, predicted, average="macro")),
        "accuracy": float((labels == predicted).mean()),
        "ece": expected_calibration_error(probabilities, labels),
        "rows": float(len(labels)),
    }
    for code, name in enumerate(TOXICITY_CLASSES):
        result |= {
            f"{name}_precision": float(precision[code]),
            f"{name}_recall": float(recall[code]),
            f"{name}_f1": float(f1[code]),
        }
    return result


def evaluation_slice(frame: pd.DataFrame) -> pd.DataFrame:
    evaluation = split(frame)[Split.EVALUATION]
    if evaluation.empty:
        raise ValueError("the data has no rows in the evaluation slice")
    return evaluation


def evaluate(model_uri: str, frame: pd.DataFrame) -> dict[str, float]:
    """Score a saved or registered model on the fixed evaluation slice of `frame`."""
    evaluation = evaluation_slice(frame)
    predicted = predict_frame(model_uri, evaluation["text"])
    probabilities = predicted[[f"prob_{name}" for name in TOXICITY_CLASSES]].to_numpy()
    return scores(evaluation["label"].to_numpy(), predicted["class"].to_numpy(), probabilities)


def evaluate_views(model_uri: str, frame: pd.DataFrame) -> dict[str, dict[str, dict]]:
    """The served model and its ablations (each `View`), each with its out-of-fold hate
    threshold and with the plain argmax, scored on the fixed evaluation slice in one pass of
    the members."""
    evaluation = evaluation_slice(frame)
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    features = model.members.features(evaluation["text"].astype(str).tolist())
    labels = evaluation["label"].to_numpy()
    calibrations = {View.STACKED.value: model.calibration, **model.ablations}
    report = {}
    for view in View:
        calibration = calibrations[view.value]
        probabilities = calibration.probabilities(features)
        report[view.value] = {
            "hate_threshold": calibration.hate_threshold,
            "thresholded": scores(labels, calibration.classes(probabilities), probabilities),
            "argmax": scores(labels, probabilities.argmax(axis=1), probabilities),
        }
    return report
