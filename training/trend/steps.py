"""The trend training pipeline's stages as plain functions: KFP components, the CLI and tests
call these, so a stage behaves the same in a unit test, locally and on the cluster.

Each KFP task runs one stage in a fresh process, so a stage imports the heavy libraries it
needs itself (Feast in `build_features`, the forecasters in the fitting stages): an ingest task
then starts in a second instead of ten."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from contentml import registry
from contentml.names import comma_list
from contentml.settings import Settings
from training import data

if TYPE_CHECKING:
    from training.trend.ensemble import EnsembleConfig

GATE_METRIC = "owa"
"""The trend gate compares OWA (M4's score against Naive2) on the held-out last horizon of
each series: lower wins."""


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
    from contentml import features

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
    from training.trend.ensemble import EnsembleConfig
    from training.trend.forecasters import Member

    names = comma_list(members)
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
    from training.trend import train

    series = train.series_from_frame(pd.read_parquet(frame_in))
    train.train(series, config, model_dir, workers)
    params = config.to_dict()
    params["members"] = ",".join(params["members"])
    params["forecasters"] = json.dumps(params["forecasters"])
    return params


def evaluate_trend(model_uri: str, frame_in: Path, workers: int) -> dict[str, float]:
    """Refit a saved (path) or registered (`models:/`) trend model's configuration on the
    frame without its last horizon, and score it there."""
    from training.trend import train

    config = train.saved_config(model_uri)
    series = train.series_from_frame(pd.read_parquet(frame_in))
    return train.evaluate(series, config, workers)


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
