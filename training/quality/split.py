"""Which split, and which cross-fitting fold, a labelled row belongs to: from a hash of its id,
so the answer never changes when rows are added or reordered. Light on purpose: the pipeline's
ingest step counts the splits without loading torch."""

from __future__ import annotations

import hashlib
from enum import StrEnum

import pandas as pd

EVALUATION_BUCKETS = 2
"""Buckets (of 10) in the evaluation slice: a fifth of the rows. Buckets 0 and 1, so the rows
of the earlier 10 % slice (bucket 0) stay in it and no version's training rows move in."""


class Split(StrEnum):
    TRAIN = "train"  # cross-fitted: every choice is made on out-of-fold predictions
    EVALUATION = "evaluation"  # the fixed slice the promotion gate scores every version on


def _bucket(row_id: str, start: int) -> int:
    return int(hashlib.sha256(row_id.encode("utf-8")).hexdigest()[start : start + 8], 16)


def split_of(row_id: str) -> Split:
    """A row's split from a hash of its id: stable when rows are added or reordered, so the
    evaluation slice never leaks into training and every version is gated on the same rows."""
    return Split.EVALUATION if _bucket(row_id, 0) % 10 < EVALUATION_BUCKETS else Split.TRAIN


def fold_of(row_id: str, folds: int) -> int:
    """A training row's cross-fitting fold, from other digits of the same hash."""
    return _bucket(row_id, 8) % folds


def split(frame: pd.DataFrame) -> dict[Split, pd.DataFrame]:
    which = frame["id"].map(split_of)
    return {s: frame[which == s].reset_index(drop=True) for s in Split}


REVIEW_ID_PREFIX = "review-"
"""Ids of the rows that are people's decisions from the review queue (`steps.reviewed_rows`)."""
