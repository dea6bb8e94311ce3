"""The stage every training pipeline ends its training with: log the saved model with its
params and metrics to MLflow, register it, and alias it `challenger`."""

from __future__ import annotations

import importlib
from pathlib import Path

import mlflow
from mlflow.models.model import ModelInfo

from contentml import registry
from contentml.settings import Settings

MODEL_LOGGERS: dict[str, str] = {
    "trend": "training.trend.train:log_saved_model",
    "quality": "training.quality.train:log_saved_model",
}
"""Model family -> the function (`module:name`) that logs and registers a model that family
saved. Named, not imported: each KFP task is a fresh process, and a trend task should not
spend seconds importing the quality model's Lightning and torch."""


def log_saved_model(family: str, model_dir: Path, model_name: str) -> ModelInfo:
    """Log and register the model of `family` saved in `model_dir` as `model_name`."""
    if family not in MODEL_LOGGERS:
        raise ValueError(f"unknown model family {family!r}; choose from {sorted(MODEL_LOGGERS)}")
    module, function = MODEL_LOGGERS[family].split(":")
    return getattr(importlib.import_module(module), function)(model_dir, model_name)


def register(
    settings: Settings,
    model_name: str,
    model_dir: Path,
    params: dict,
    metrics: dict[str, float],
    run_name: str,
    family: str = "trend",
) -> str:
    """Log the model with its params and metrics, register it, alias it `challenger`;
    `family` names the kind of model saved in `model_dir` (a key of `MODEL_LOGGERS`)."""
    client = registry.connect(settings)
    with mlflow.start_run(
        experiment_id=registry.experiment_id(client, settings), run_name=run_name
    ):
        # KFP metadata turns every number into a float; log whole numbers as such.
        mlflow.log_params(
            {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in params.items()}
        )
        mlflow.log_metrics(metrics)
        info = log_saved_model(family, model_dir, model_name)
    version = str(info.registered_model_version)
    registry.register_challenger(client, model_name, version, f"trained by {run_name}")
    return version
