"""The issue's check of the review queue, as a user runs it: a borderline text sent to
`POST /score/quality` of a real `contentml serve` appears in `contentml review list`; approving
it with `contentml review approve` adds a row that the next `contentml quality train` reads
(its run's `review_rows` param), in the training split only."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
import yaml

from entrypoints.demo import free_port, model_server
from tests.conftest import make_settings, run_cli
from tests.helpers.quality import TINY_RECIPE, sample_toxicity
from training.quality import split, steps

pytestmark = pytest.mark.slow

CANDIDATES = [
    "you people are something else",
    "that ref was trash lol",
    "what a dumb idea",
    "I hate mondays so much",
    "this song is sick, kill it with fire",
    "honestly the worst take I have heard all week",
]
"""Texts a tiny model is unsure about: at least one of them is sent to review."""


def train_once(home: Path, data: Path, recipe: Path) -> dict:
    done = run_cli(home, "quality", "train", "--data", str(data), "--config", str(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_reviewed_text_becomes_a_training_row_of_the_next_run(tmp_path: Path):
    home = tmp_path / "state"
    sample, _ = sample_toxicity(rows_per_class=150)
    data = tmp_path / "small.csv"
    sample.to_csv(data, index=False)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    first = train_once(home, data, recipe)
    assert first["rows"]["review_rows"] == 0

    with model_server(make_settings(home), free_port(), "--workers", "0") as url:
        answers = [
            httpx.post(
                f"{url}/score/quality",
                json={"text": text, "channel": "e2e", "video_id": f"vid-{i}"},
                timeout=30,
            ).json()
            for i, text in enumerate(CANDIDATES)
        ]
    reviewed = [a for a in answers if a["decision"] == "review"]
    assert reviewed, answers
    item_id = reviewed[0]["review_item"]

    listed = run_cli(home, "review", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    items = {i["item_id"]: i for i in json.loads(listed.stdout)["items"]}
    assert set(items) == {a["review_item"] for a in reviewed}
    assert (items[item_id]["channel"], items[item_id]["model_version"]) == ("e2e", "1")
    approved = run_cli(home, "review", "approve", item_id)
    assert approved.returncode == 0 and "labelled neither" in approved.stdout

    second = train_once(home, data, recipe)
    assert second["rows"]["review_rows"] == 1
    assert second["rows"]["train"] == first["rows"]["train"] + 1
    assert second["rows"]["evaluation"] == first["rows"]["evaluation"]
    settings = make_settings(home)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    runs = mlflow.search_runs(experiment_names=[settings.mlflow_experiment])
    assert sorted(runs["params.review_rows"]) == ["0", "1"]

    frame = tmp_path / "frame.parquet"
    steps.ingest_toxicity(data, frame, settings)
    rows = pd.read_parquet(frame)
    (row,) = rows[rows["id"].str.startswith("review-")].itertuples()
    text = items[item_id]["text"]
    assert (row.text, row.label, split.split_of(row.id)) == (text, 2, split.Split.TRAIN)
