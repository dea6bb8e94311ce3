"""Train and evaluate the trend model: typed functions the KFP components and tests call."""

from __future__ import annotations

import importlib.metadata
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from training.trend import metrics
from training.trend.model import (
    ProphetConfig,
    TrendForecast,
    TrendRequest,
    forecast_cache,
    save_artifacts,
)

FORECASTER_CODE = Path(__file__).with_name("forecaster_code.py")

# Pinned from the running environment so serving installs what training used; listing them
# also spares MLflow from inferring requirements by running the model in a subprocess.
SERVING_REQUIREMENTS = ("mlflow", "prophet", "pandas", "numpy", "pyarrow", "pydantic")

Predict = Callable[[list[TrendRequest]], list[TrendForecast]]


def series_from_frame(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Hourly values per series, oldest first, from a Feast training frame.

    Hours of the window before a series starts come back from Feast without a value.
    """
    ordered = frame.dropna(subset=["interest"]).sort_values(["series_id", "event_timestamp"])
    return {
        series_id: group["interest"].to_numpy(dtype=float)
        for series_id, group in ordered.groupby("series_id", sort=True)
    }


def evaluate(predict: Predict, series: dict[str, np.ndarray], horizon: int) -> dict[str, float]:
    """Hold out the last `horizon` hours of each series; score the model and seasonal naive.

    The model only sees the shortened history (no series id), so every model is refitted on
    exactly the same data: the comparison the promotion gate relies on.
    """
    if not series:
        raise ValueError("no series to evaluate")
    histories = {sid: values[:-horizon] for sid, values in series.items()}
    requests = [TrendRequest(history=h.tolist(), horizon=horizon) for h in histories.values()]
    forecasts = predict(requests)
    scores: dict[str, list[float]] = {
        name: [] for name in ("smape", "mase", "direction_accuracy", "naive_smape", "naive_mase")
    }
    for (sid, history), result in zip(histories.items(), forecasts, strict=True):
        actual = series[sid][-horizon:]
        forecast = np.asarray(result.forecast)
        naive = metrics.seasonal_naive(history, horizon)
        scores["smape"].append(metrics.smape(actual, forecast))
        scores["mase"].append(metrics.mase(history, actual, forecast))
        scores["direction_accuracy"].append(
            float(metrics.direction(history, forecast) == metrics.direction(history, actual))
        )
        scores["naive_smape"].append(metrics.smape(actual, naive))
        scores["naive_mase"].append(metrics.mase(history, actual, naive))
    result = {name: float(np.mean(values)) for name, values in scores.items()}
    result["series"] = float(len(series))
    return result


def train(
    series: dict[str, np.ndarray], config: ProphetConfig, horizon: int, model_dir: Path
) -> Path:
    """Precompute every series' forecast and save the pyfunc model to `model_dir`."""
    cache = forecast_cache(series, horizon, config)
    with tempfile.TemporaryDirectory() as scratch:
        artifacts = save_artifacts(config, cache, Path(scratch))
        example = [{"series_id": next(iter(series)), "horizon": horizon}]
        mlflow.pyfunc.save_model(str(model_dir), **pyfunc_arguments(artifacts, example))
    return model_dir


def pyfunc_arguments(artifacts: dict[str, str], input_example: list[dict]) -> dict:
    """What `save_model` and `log_model` both need, so a saved and a logged model match."""
    return {
        "python_model": str(FORECASTER_CODE),
        "artifacts": artifacts,
        "input_example": input_example,
        "pip_requirements": [
            f"{name}=={importlib.metadata.version(name)}" for name in SERVING_REQUIREMENTS
        ],
    }


def log_saved_model(model_dir: Path, registered_name: str) -> mlflow.models.model.ModelInfo:
    """Log a model saved by `train` to the active MLflow run and register it."""
    saved = mlflow.models.Model.load(str(model_dir))
    folder = model_dir / "artifacts"
    artifacts = {
        "config": str(folder / "config.json"),
        "forecasts": str(folder / "forecasts.parquet"),
    }
    example = saved.load_input_example(str(model_dir))
    return mlflow.pyfunc.log_model(
        name="model",
        registered_model_name=registered_name,
        **pyfunc_arguments(artifacts, example),
    )
