"""The quality training pipeline's stages as plain functions: KFP components, the CLI
(`contentml quality train` runs them all in one process) and tests call these."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from contentml import registry
from contentml.settings import Settings
from training import data
from training.quality import train
from training.quality.config import QualityConfig
from training.register import register


def ingest_toxicity(data_path: Path, frame_out: Path) -> dict[str, int]:
    """Read a labelled toxicity CSV into a clean table, with the split of every row."""
    frame = data.load_toxicity(data_path)
    frame.to_parquet(frame_out, index=False)
    sizes = {s.value: len(part) for s, part in train.split(frame).items()}
    return {"rows": len(frame), **sizes}


def train_quality(frame_in: Path, model_dir: Path, config: QualityConfig) -> dict:
    """Fine-tune and calibrate the quality classifier and save it as an MLflow pyfunc; returns
    the recipe and the training summary to log."""
    summary = train.train(pd.read_parquet(frame_in), config, model_dir)
    return {**config.to_dict(), **summary}


def evaluate_quality(model_uri: str, frame_in: Path) -> dict[str, float]:
    """Score a saved or registered quality model on the fixed evaluation slice."""
    return train.evaluate(model_uri, pd.read_parquet(frame_in))


def promotion_gate(
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
        metric=train.GATE_METRIC,
        greater_is_better=True,
        challenger_score=challenger_metrics[train.GATE_METRIC],
        score_champion=lambda uri: evaluate_quality(uri, frame_in)[train.GATE_METRIC],
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
        gate = promotion_gate(settings, model_name, version, frame, metrics, margin)
    return {
        "model": model_name,
        "version": version,
        "rows": rows,
        "metrics": metrics,
        "gate": asdict(gate),
    }
