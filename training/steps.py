"""The training pipeline's stages as plain functions: KFP components, the CLI and tests call
these, so a stage behaves the same in a unit test, locally and on the cluster."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models.model import ModelInfo

from contentml import features, registry
from contentml.settings import Settings
from training import data
from training.quality import train as quality_train
from training.quality.config import QualityConfig
from training.trend import train as trend_train
from training.trend.ensemble import EnsembleConfig
from training.trend.forecasters import Member

GATE_METRIC = "owa"
"""The trend gate compares OWA (M4's score against Naive2) on the held-out last horizon of
each series: lower wins."""

MODEL_LOGGERS: dict[str, Callable[[Path, str], ModelInfo]] = {
    "trend": trend_train.log_saved_model,
    "quality": quality_train.log_saved_model,
}
"""Model family -> the function that logs and registers a model that family saved."""


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


def ensemble_config(horizon: int, members: str, validation_origins: int) -> EnsembleConfig:
    """The ensemble configuration from pipeline parameters (`members` comma-separated)."""
    names = [name.strip() for name in members.split(",") if name.strip()]
    known = [m.value for m in Member]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown trend members {unknown}; choose from {known}")
    return EnsembleConfig(
        horizon=horizon,
        members=tuple(Member(name) for name in names),
        validation_origins=validation_origins,
    )


def train_trend(frame_in: Path, model_dir: Path, config: EnsembleConfig, workers: int) -> dict:
    """Fit the trend ensemble on the training frame and save it as an MLflow pyfunc; returns
    the hyperparameters to log."""
    series = trend_train.series_from_frame(pd.read_parquet(frame_in))
    trend_train.train(series, config, model_dir, workers)
    params = config.to_dict()
    params["members"] = ",".join(params["members"])
    params["forecasters"] = json.dumps(params["forecasters"])
    return params


def evaluate_trend(model_uri: str, frame_in: Path, workers: int) -> dict[str, float]:
    """Refit a saved (path) or registered (`models:/`) trend model's configuration on the
    frame without its last horizon, and score it there."""
    config = trend_train.saved_config(model_uri)
    series = trend_train.series_from_frame(pd.read_parquet(frame_in))
    return trend_train.evaluate(series, config, workers)


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
        info = MODEL_LOGGERS[family](model_dir, model_name)
    version = str(info.registered_model_version)
    registry.register_challenger(client, model_name, version, f"trained by {run_name}")
    return version


def promotion_gate(
    settings: Settings,
    model_name: str,
    version: str,
    frame_in: Path,
    workers: int,
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
        score_champion=lambda uri: evaluate_trend(uri, frame_in, workers)[GATE_METRIC],
        margin=margin,
    )


def ingest_toxicity(data_path: Path, frame_out: Path) -> dict[str, int]:
    """Read a labelled toxicity CSV into a clean table, with the split of every row."""
    frame = data.load_toxicity(data_path)
    frame.to_parquet(frame_out, index=False)
    sizes = {s.value: len(part) for s, part in quality_train.split(frame).items()}
    return {"rows": len(frame), **sizes}


def train_quality(frame_in: Path, model_dir: Path, config: QualityConfig) -> dict:
    """Fine-tune and calibrate the quality classifier and save it as an MLflow pyfunc; returns
    the recipe and the training summary to log."""
    summary = quality_train.train(pd.read_parquet(frame_in), config, model_dir)
    return {**config.to_dict(), **summary}


def evaluate_quality(model_uri: str, frame_in: Path) -> dict[str, float]:
    """Score a saved or registered quality model on the fixed evaluation slice."""
    return quality_train.evaluate(model_uri, pd.read_parquet(frame_in))


def quality_promotion_gate(
    settings: Settings,
    model_name: str,
    version: str,
    frame_in: Path,
    challenger_metrics: dict[str, float],
    margin: float,
) -> registry.GateDecision:
    """Promote the challenger when its weighted F1 on the evaluation slice beats the champion's."""
    return registry.promotion_gate(
        registry.connect(settings),
        model_name,
        version,
        metric=quality_train.GATE_METRIC,
        greater_is_better=True,
        challenger_score=challenger_metrics[quality_train.GATE_METRIC],
        score_champion=lambda uri: evaluate_quality(uri, frame_in)[quality_train.GATE_METRIC],
        margin=margin,
    )


def run_quality_training(
    settings: Settings,
    data_path: Path,
    config: QualityConfig,
    model_name: str,
    margin: float,
    run_name: str,
) -> dict:
    """The quality pipeline's stages in this process (`contentml quality train`): ingest,
    train, evaluate, register as challenger, and gate against the champion."""
    with tempfile.TemporaryDirectory() as scratch:
        frame = Path(scratch) / "toxicity.parquet"
        model_dir = Path(scratch) / "model"
        rows = ingest_toxicity(data_path, frame)
        params = train_quality(frame, model_dir, config)
        metrics = evaluate_quality(str(model_dir), frame)
        version = register(
            settings, model_name, model_dir, params, metrics, run_name, family="quality"
        )
        gate = quality_promotion_gate(settings, model_name, version, frame, metrics, margin)
    return {
        "model": model_name,
        "version": version,
        "rows": rows,
        "metrics": metrics,
        "gate": asdict(gate),
    }
