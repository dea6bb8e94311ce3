"""Train, save and evaluate the quality classifier: typed functions the CLI, the KFP
components and the tests call."""

from __future__ import annotations

import hashlib
import importlib.metadata
import tempfile
from enum import StrEnum
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_fscore_support

from training.data import TOXICITY_CLASSES
from training.quality import classifier, lexical
from training.quality.calibration import Calibration, calibrate, expected_calibration_error
from training.quality.config import QualityConfig
from training.quality.policy import DEFAULT_POLICY

SCORER_CODE = Path(__file__).with_name("scorer_code.py")

# Pinned from the running environment so serving installs what training used.
SERVING_REQUIREMENTS = (
    "mlflow", "numpy", "pandas", "scipy", "scikit-learn", "torch", "transformers", "tokenizers",
    "safetensors", "pyyaml", "phonenumbers", "datasketch", "joblib",
)  # fmt: skip

CLASSIFIER_ARTIFACT = "classifier"
LEXICAL_ARTIFACT = "lexical"
CALIBRATION_ARTIFACT = "calibration"
POLICY_ARTIFACT = "policy"
GATE_METRIC = "weighted_f1"
"""The quality gate compares weighted F1 on the fixed evaluation slice: higher wins."""


class Split(StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"  # early stopping, temperature and the hate threshold
    EVALUATION = "evaluation"  # the fixed slice the promotion gate scores every version on


def split_of(row_id: str) -> Split:
    """A row's split from a hash of its id: stable when rows are added or reordered, so the
    evaluation slice never leaks into training and every version is gated on the same rows."""
    bucket = int(hashlib.sha256(row_id.encode("utf-8")).hexdigest()[:8], 16) % 10
    return Split.EVALUATION if bucket == 0 else Split.VALIDATION if bucket == 1 else Split.TRAIN


def split(frame: pd.DataFrame) -> dict[Split, pd.DataFrame]:
    which = frame["id"].map(split_of)
    return {s: frame[which == s].reset_index(drop=True) for s in Split}


def train(frame: pd.DataFrame, config: QualityConfig, model_dir: Path) -> dict[str, float]:
    """Fine-tune on the training split, calibrate on the validation split, and save an MLflow
    pyfunc in `model_dir`. Returns the per-epoch history and validation scores to log."""
    parts = split(frame)
    training = parts[Split.TRAIN]
    if config.max_train_rows is not None and len(training) > config.max_train_rows:
        # Stratified so a small smoke run still sees every class.
        training = training.groupby("label", group_keys=False).sample(
            frac=config.max_train_rows / len(training), random_state=config.seed
        )
    validation = parts[Split.VALIDATION]
    model, tokenizer, epochs = classifier.fit(training, validation, config)
    word_model = lexical.fit_lexical(
        training["text"].tolist(), training["label"].to_numpy(), config.lexical_c
    )
    texts = validation["text"].tolist()
    logits = lexical.blend(
        classifier.predict_logits(model, tokenizer, texts), word_model, texts, config.lexical_weight
    )
    labels = validation["label"].to_numpy()
    calibration = calibrate(logits, labels, config.hate_recall_target, config.lexical_weight)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        artifacts = {
            CLASSIFIER_ARTIFACT: classifier.save_fitted(
                model, tokenizer, scratch / CLASSIFIER_ARTIFACT
            ),
            LEXICAL_ARTIFACT: lexical.save_lexical(word_model, scratch / "lexical.joblib"),
            CALIBRATION_ARTIFACT: calibration.save(scratch / "calibration.json"),
            POLICY_ARTIFACT: DEFAULT_POLICY,
        }
        example = pd.DataFrame({"text": ["what a great video", "subscribe for more"]})
        mlflow.pyfunc.save_model(str(model_dir), **pyfunc_arguments(artifacts, example))
    probabilities = calibration.probabilities(logits)
    summary = {
        "train_rows": float(len(training)),
        "validation_rows": float(len(validation)),
        "temperature": calibration.temperature,
        "hate_threshold": calibration.hate_threshold,
        "validation_ece_raw": expected_calibration_error(
            Calibration(1.0, 0.5).probabilities(logits), labels
        ),
        "validation_ece": expected_calibration_error(probabilities, labels),
    }
    for epoch, metrics in enumerate(epochs):
        summary |= {f"epoch_{epoch}_{name}": value for name, value in metrics.items()}
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
    """Weighted F1 (the gate's metric), per-class precision/recall/F1, and calibration error."""
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=range(len(TOXICITY_CLASSES)), zero_division=0.0
    )
    result = {
        GATE_METRIC: float(f1_score(labels, predicted, average="weighted")),
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


def evaluate(model_uri: str, frame: pd.DataFrame) -> dict[str, float]:
    """Score a saved or registered model on the fixed evaluation slice of `frame`."""
    evaluation = split(frame)[Split.EVALUATION]
    if evaluation.empty:
        raise ValueError("the data has no rows in the evaluation slice")
    predicted = predict_frame(model_uri, evaluation["text"])
    probabilities = predicted[[f"prob_{name}" for name in TOXICITY_CLASSES]].to_numpy()
    return scores(evaluation["label"].to_numpy(), predicted["class"].to_numpy(), probabilities)
