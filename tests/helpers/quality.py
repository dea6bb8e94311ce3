"""Quality test data shared by the model, serving and end-to-end tests: the real toxicity
file, a class-balanced sample of it, the tiny recipe and an everyday sentence."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from tests.conftest import DATA_DIR

TOXICITY_CSV = DATA_DIR / "toxicity" / "train.csv"

TINY_RECIPE = {
    "max_train_rows": 300,
    "epochs": 1,
    "max_length": 32,
    "batch_size": 16,
    "learning_rate": 3e-4,
    "folds": 2,
}
"""Trains in ~25 s on two cores (two fold encoders on ~150 rows each). The higher learning
rate and smaller batches give the ~10 optimiser steps of one epoch on 150 rows enough signal
for the directional tests."""

CLEAN = (
    "We planted tomatoes in the garden this morning and watched the sunset over the hills "
    "with our friends, then cooked a big pot of soup for everyone. "
)
"""An everyday sentence a content gate must let through; repeated for long texts."""


def sample_toxicity(rows_per_class: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The real toxicity file split into a class-balanced sample and the rows not in it, both
    as raw text with the file's own (blank) id header, ready for `to_csv(index=False)`."""
    raw = pd.read_csv(TOXICITY_CSV, dtype=str, keep_default_na=False)
    raw = raw.rename(columns={raw.columns[0]: ""})
    sample = raw.groupby("class", group_keys=False).sample(n=rows_per_class, random_state=seed)
    return sample, raw.drop(index=sample.index)


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)
    return path
