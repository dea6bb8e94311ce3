"""The training pipeline's stages as plain functions: KFP components, the CLI and tests call
these, so a stage behaves the same in a unit test, locally and on the cluster."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import mlflow
import pandas as pd

from contentml import features, registry
from contentml.settings import Settings
from training import data
from training.trend import train as trend_train
from training.trend.model import ProphetConfig

GATE_METRIC = "smape"
"""The trend gate compares sMAPE on the held-out last horizon of each series (lower wins)."""


def ingest(
    settings: Settings, max_series: int, series_out: Path, videos_out: Path
) -> dict[str, int]:
    """Read the raw data sets into clean tables."""
    if max_series < 1:
        raise ValueError(f"max_series must be at least 1, not {max_series}")
    series = data.load_m4_hourly(
        settings.data_dir / "m4-hourly" / "Hourly-train.csv", limit=max_series
    )
    videos = data.load_youtube_trending(settings.data_dir)
    series.to_parquet(series_out, index=False)
    videos.to_parquet(videos_out, index=False)
    return {"series": int(series["series_id"].nunique()), "videos": len(videos)}


def build_features(
    settings: Settings, series_in: Path, videos_in: Path, window_hours: int, frame_out: Path
) -> dict[str, int]:
    """Publish the tables to Feast, materialize the online store, and retrieve a
    point-in-time correct training frame for the last `window_hours` of every series."""
    series = pd.read_parquet(series_in)
    videos = pd.read_parquet(videos_in)
    store = features.feature_store(settings)
    features.write_sources(settings, series, videos)
    features.apply_definitions(store)
    end = series["event_timestamp"].max()
    features.materialize(store, end.to_pydatetime())
    start = end - pd.Timedelta(hours=window_hours - 1)
    frame = features.trend_training_frame(
        store, sorted(series["series_id"].unique()), start.to_pydatetime(), end.to_pydatetime()
    )
    frame.to_parquet(frame_out, index=False)
    return {
        "rows": len(frame),
        "series": int(frame["series_id"].nunique()),
        "window_hours": window_hours,
        "window_end": end.isoformat(),
    }


def train_trend(frame_in: Path, model_dir: Path, horizon: int, config: ProphetConfig) -> dict:
    """Fit the trend model on the training frame and save it as an MLflow pyfunc; returns
    the hyperparameters to log."""
    series = trend_train.series_from_frame(pd.read_parquet(frame_in))
    trend_train.train(series, config, horizon, model_dir)
    return {"horizon": horizon, **asdict(config)}


def evaluate_trend(model_uri: str, frame_in: Path, horizon: int) -> dict[str, float]:
    """Score a saved (path) or registered (`models:/`) trend model on the frame's held-out
    last horizon."""
    model = mlflow.pyfunc.load_model(model_uri)
    series = trend_train.series_from_frame(pd.read_parquet(frame_in))
    return trend_train.evaluate(model.predict, series, horizon)


def register(
    settings: Settings,
    model_name: str,
    model_dir: Path,
    params: dict,
    metrics: dict[str, float],
    run_name: str,
) -> str:
    """Log the model with its params and metrics, register it, alias it `challenger`."""
    client = registry.connect(settings)
    with mlflow.start_run(
        experiment_id=registry.experiment_id(client, settings), run_name=run_name
    ):
        # KFP metadata turns every number into a float; log whole numbers as such.
        mlflow.log_params(
            {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in params.items()}
        )
        mlflow.log_metrics(metrics)
        info = trend_train.log_saved_model(model_dir, model_name)
    version = str(info.registered_model_version)
    registry.set_alias(
        client,
        model_name,
        registry.Alias.CHALLENGER,
        version,
        action="register",
        reason=f"trained by {run_name}",
    )
    return version


def promotion_gate(
    settings: Settings,
    model_name: str,
    version: str,
    frame_in: Path,
    horizon: int,
    challenger_metrics: dict[str, float],
    margin: float,
) -> registry.GateDecision:
    """Promote the challenger to champion if it beats the champion on the same frame."""
    client = registry.connect(settings)
    return registry.promotion_gate(
        client,
        model_name,
        version,
        metric=GATE_METRIC,
        greater_is_better=False,
        challenger_score=challenger_metrics[GATE_METRIC],
        score_champion=lambda uri: evaluate_trend(uri, frame_in, horizon)[GATE_METRIC],
        margin=margin,
    )
