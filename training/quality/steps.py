"""The quality training pipeline's stages as plain functions: KFP components, the CLI
(`contentml quality train` runs them all in one process) and tests call these.

Each KFP task runs one stage in a fresh process, so the stages that fit or score the model
import it (torch, transformers, lightning) themselves: the ingest, register and first gate
tasks start in two seconds instead of eight."""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from contentml import registry
from contentml.settings import Settings
from training import data
from training.quality.config import QualityConfig
from training.quality.review_store import ReviewStore
from training.quality.split import REVIEW_ID_PREFIX, Split, split, split_of
from training.register import register

GATE_METRIC = "weighted_f1"
"""The quality gate compares weighted F1 on the fixed evaluation slice: higher wins."""


def ingest_toxicity(data_path: Path, frame_out: Path, settings: Settings) -> dict[str, int]:
    """Read a labelled toxicity CSV into a clean table, add the people's decisions of the
    review queue as training rows (`reviewed_rows`), and count the rows of each split
    (`review_rows`: the decisions; logged with the run)."""
    reviewed = reviewed_rows(settings)
    frame = pd.concat([data.load_toxicity(data_path), reviewed], ignore_index=True)
    frame.to_parquet(frame_out, index=False)
    sizes = {s.value: len(part) for s, part in split(frame).items()}
    return {"rows": len(frame), "review_rows": len(reviewed), **sizes}


def reviewed_rows(settings: Settings) -> pd.DataFrame:
    """The review queue's decided items (`training/quality/review_store.py`) as labelled rows
    (`id`, `text`, `label`), each id one the split puts in training: a person's decision
    teaches the next version, it never enters the evaluation slice every version is gated
    on."""
    store = ReviewStore.from_settings(settings)
    try:
        rows = store.labelled_rows()
    finally:
        store.close()
    return pd.DataFrame(
        {
            "id": [_training_id(item_id) for item_id in rows["item_id"]],
            "text": rows["text"],
            "label": rows["label"],
        }
    )


def _training_id(item_id: str) -> str:
    """`review-<item>-<n>`, the first n whose hash the split sends to training."""
    spellings = (f"{REVIEW_ID_PREFIX}{item_id}-{n}" for n in itertools.count())
    return next(row_id for row_id in spellings if split_of(row_id) is Split.TRAIN)


def train_quality(frame_in: Path, model_dir: Path, config: QualityConfig) -> dict:
    """Fine-tune and calibrate the quality classifier and save it as an MLflow pyfunc; returns
    the recipe and the training summary to log."""
    from training.quality import train

    summary = train.train(pd.read_parquet(frame_in), config, model_dir)
    return {**config.to_dict(), **summary}


def evaluate_quality(model_uri: str, frame_in: Path) -> dict[str, float]:
    """Score a saved or registered quality model on the fixed evaluation slice."""
    from training.quality import train

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
        metric=GATE_METRIC,
        greater_is_better=True,
        challenger_score=challenger_metrics[GATE_METRIC],
        score_champion=lambda uri: evaluate_quality(uri, frame_in)[GATE_METRIC],
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
        rows = ingest_toxicity(data_path, frame, settings)
        params = train_quality(frame, model_dir, config)
        metrics = evaluate_quality(str(model_dir), frame)
        # The data's counts (`review_rows` among them) with the recipe, as the pipeline does.
        version = register(
            settings, model_name, model_dir, {**rows, **params}, metrics, run_name, "quality"
        )
        gate = promotion_gate(settings, model_name, version, frame, metrics, margin)
    return {
        "model": model_name,
        "version": version,
        "rows": rows,
        "metrics": metrics,
        "gate": asdict(gate),
    }
