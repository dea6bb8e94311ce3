"""Review decisions flow back into training: the quality pipeline's ingest step
(`training.quality.steps.ingest_toxicity`) adds each decided item as a labelled training row,
never into the evaluation slice, and counts them (`review_rows`, logged with the run)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from contentml import events
from tests.conftest import make_settings
from training.quality import split, steps
from training.quality.review_store import ReviewStore, Source

REVIEW = {
    "decision": "review",
    "score": 0.7,
    "labels": {"hate_speech": 0.1, "offensive_language": 0.2, "neither": 0.7},
    "reasons": [{"check": "classifier", "severity": "review", "detail": "score 0.70"}],
    "model_version": "1",
}


@pytest.fixture
def labelled_csv(tmp_path: Path) -> Path:
    path = tmp_path / "toxicity.csv"
    rows = [(f"row{i}", i % 3, f"tweet number {i}") for i in range(40)]
    pd.DataFrame(rows, columns=["", "class", "tweet"]).to_csv(path, index=False)
    return path


def test_decisions_become_training_rows_and_only_training_rows(settings, labelled_csv, tmp_path):
    events.configure(settings)
    store = ReviewStore.from_settings(settings)
    decided = []
    for i in range(30):  # enough that a plain hash split would put some in evaluation
        item = store.add_prediction(f"borderline text {i}", REVIEW, Source.TASK, video_id=f"v{i}")
        decided.append(store.decide(item.item_id, "approve" if i % 2 else "reject"))
    store.add_prediction("still undecided", REVIEW, Source.TASK)
    store.close()

    frame_path = tmp_path / "frame.parquet"
    counts = steps.ingest_toxicity(labelled_csv, frame_path, settings)
    frame = pd.read_parquet(frame_path)

    assert counts["review_rows"] == 30 and counts["rows"] == 40 + 30
    reviewed = frame[frame["id"].str.startswith("review-")]
    assert sorted(reviewed["text"]) == sorted(item.text for item in decided)
    expected = {item.text: 2 if item.label == "neither" else 1 for item in decided}
    assert dict(zip(reviewed["text"], reviewed["label"], strict=True)) == expected
    parts = split.split(frame)
    assert set(reviewed["id"]) <= set(parts[split.Split.TRAIN]["id"])
    assert not parts[split.Split.EVALUATION]["id"].str.startswith("review-").any()
    # The evaluation slice is the CSV's alone, the same with or without decisions.
    empty = make_settings(tmp_path / "empty")
    plain = steps.ingest_toxicity(labelled_csv, tmp_path / "plain.parquet", empty)
    assert plain["evaluation"] == counts["evaluation"] and plain["review_rows"] == 0
