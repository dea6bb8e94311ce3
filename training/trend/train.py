"""Train and evaluate the trend model: typed functions the KFP components and tests call."""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from training.trend.backtest import score_holdout
from training.trend.ensemble import EnsembleConfig, TrendEnsemble, load_ensemble, save_ensemble

FORECASTER_CODE = Path(__file__).with_name("forecaster_code.py")

# Pinned from the running environment so serving installs what training used; listing them
# also spares MLflow from inferring requirements by running the model in a subprocess.
SERVING_REQUIREMENTS = (
    "mlflow", "numpy", "pandas", "pyarrow", "pydantic", "scikit-learn", "scipy", "statsmodels",
    "joblib", "threadpoolctl", "prophet",
)  # fmt: skip

ENSEMBLE_ARTIFACT = "ensemble"


def series_from_frame(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Hourly values per series, oldest first, from a Feast training frame.

    Hours of the window before a series starts come back from Feast without a value.
    """
    ordered = frame.dropna(subset=["interest"]).sort_values(["series_id", "event_timestamp"])
    return {
        series_id: group["interest"].to_numpy(dtype=float)
        for series_id, group in ordered.groupby("series_id", sort=True)
    }


def evaluate(
    series: dict[str, np.ndarray], config: EnsembleConfig, workers: int
) -> dict[str, float]:
    """Hold out the last horizon of each series and score a fresh fit of `config` on the rest,
    beside the reference forecasters (`seasonal_naive_owa`, `prophet_default_owa`, ...).

    Every model is refitted on exactly the same data: the comparison the promotion gate uses.
    """
    scores = score_holdout(series, config.horizon, workers, config)
    flat = dict(scores.pop("ensemble"))
    for name, values in scores.items():
        flat |= {f"{name}_{metric}": value for metric, value in values.items()}
    flat["series"] = float(len(series))
    return flat


def train(
    series: dict[str, np.ndarray], config: EnsembleConfig, model_dir: Path, workers: int
) -> None:
    """Fit the ensemble on every whole series and save it as an MLflow pyfunc in `model_dir`."""
    ensemble = TrendEnsemble(config).fit(series, workers)
    with tempfile.TemporaryDirectory() as scratch:
        folder = save_ensemble(ensemble, Path(scratch) / ENSEMBLE_ARTIFACT)
        example = [{"series_id": ensemble.series_ids[0], "horizon": config.horizon}]
        mlflow.pyfunc.save_model(str(model_dir), **pyfunc_arguments(folder, example))


def saved_config(model_uri: str) -> EnsembleConfig:
    """The ensemble configuration of a saved or registered trend model."""
    model = mlflow.pyfunc.load_model(model_uri)
    return model.unwrap_python_model().ensemble.config


def pyfunc_arguments(ensemble_dir: Path, input_example: list[dict]) -> dict:
    """What `save_model` and `log_model` both need, so a saved and a logged model match."""
    return {
        "python_model": str(FORECASTER_CODE),
        "artifacts": {ENSEMBLE_ARTIFACT: str(ensemble_dir)},
        "input_example": input_example,
        "pip_requirements": [
            f"{name}=={importlib.metadata.version(name)}" for name in SERVING_REQUIREMENTS
        ],
    }


def log_saved_model(model_dir: Path, registered_name: str) -> mlflow.models.model.ModelInfo:
    """Log a model saved by `train` to the active MLflow run and register it."""
    saved = mlflow.models.Model.load(str(model_dir))
    ensemble_dir = model_dir / "artifacts" / ENSEMBLE_ARTIFACT
    load_ensemble(ensemble_dir)  # refuse to register a folder that does not load
    return mlflow.pyfunc.log_model(
        name="model",
        registered_model_name=registered_name,
        **pyfunc_arguments(ensemble_dir, saved.load_input_example(str(model_dir))),
    )
