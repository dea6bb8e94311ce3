"""The human review queue's store (`training/quality/review_store.py`) on SQLite and on the real
PostgreSQL: dedupe, decisions and their labels, expiry, events and training rows."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from contentml import events
from contentml.errors import UserError
from tests.conftest import make_settings
from training.quality import review_store
from training.quality.review_store import (
    AlreadyDecided,
    Decision,
    ItemNotFound,
    NewItem,
    ReviewStore,
    Source,
    Status,
)

BORDERLINE = {
    "score": 0.7,
    "decision": "review",
    "class": 2,
    "confidence": 0.7,
    "labels": {"hate_speech": 0.05, "offensive_language": 0.25, "neither": 0.7},
    "reasons": [{"check": "classifier", "severity": "review", "detail": "score 0.70 below 0.85"}],
    "model_version": "3",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> Iterator[ReviewStore]:
    """A review store on SQLite, or on the module's PostgreSQL database (skipped with the
    reason when PostgreSQL is not running); events go to a SQL bus in the test's folder."""
    settings = make_settings(tmp_path / "state")
    events.configure(settings)
    if request.param == "sqlite":
        store = ReviewStore.from_settings(settings)
    else:
        store = ReviewStore(request.getfixturevalue("postgres_url"))
        with store.engine.begin() as connection:
            connection.execute(review_store.items.delete())
    store.bus = events.SqlBus(settings.backend_store)
    yield store
    store.close()


def published(store: ReviewStore) -> list[tuple[str, str]]:
    return [(e.kind.value, e.data["item_id"]) for _, e in store.bus.after(0)]


def test_a_review_decision_is_queued_with_everything_a_person_needs(store):
    item = store.add_prediction("is this ok?", BORDERLINE, Source.V1, "chan-1", "vid-1")
    assert item.status is Status.PENDING
    assert (item.text, item.channel, item.video_id, item.model_version) == (
        "is this ok?",
        "chan-1",
        "vid-1",
        "3",
    )
    assert item.labels == BORDERLINE["labels"]
    assert item.reasons == BORDERLINE["reasons"]
    assert item.source == "v1"
    assert store.list_items() == [item]
    assert published(store) == [("review.created", item.item_id)]


def test_only_review_decisions_are_queued(store):
    for decision in ("pass", "reject"):
        assert (
            store.add_prediction("fine", {**BORDERLINE, "decision": decision}, Source.TASK) is None
        )
    assert store.list_items() == []


def test_the_same_text_for_the_same_video_is_one_item(store):
    first = store.add_prediction("same words", BORDERLINE, Source.TASK, video_id="v")
    again = store.add_prediction("same words", BORDERLINE, Source.BATCH, video_id="v")
    other_video = store.add_prediction("same words", BORDERLINE, Source.TASK, video_id="w")
    assert again.item_id == first.item_id and again.seen == 2
    assert again.source == "task"  # the first scoring is kept
    assert other_video.item_id != first.item_id
    assert len(store.list_items()) == 2
    assert [kind for kind, _ in published(store)] == ["review.created"] * 2


def test_approve_labels_neither_and_a_second_decision_is_refused(store):
    item = store.add_prediction("borderline", BORDERLINE, Source.TASK)
    decided = store.decide(item.item_id, "approve", note="satire")
    assert (decided.status, decided.label, decided.note) == (Status.APPROVED, "neither", "satire")
    with pytest.raises(AlreadyDecided, match="already decided: approved"):
        store.decide(item.item_id, Decision.REJECT)
    assert store.get(item.item_id).status is Status.APPROVED  # nothing stored was lost
    assert store.list_items() == [] and store.list_items(Status.APPROVED) == [decided]
    assert published(store)[-1] == ("review.decided", item.item_id)


def test_reject_takes_the_given_label_else_the_classifiers_flagged_one(store):
    flagged = store.add_prediction("a", BORDERLINE, Source.TASK)
    named = store.add_prediction("b", BORDERLINE, Source.TASK)
    assert store.decide(flagged.item_id, "reject").label == "offensive_language"
    assert store.decide(named.item_id, "reject", label="hate_speech").label == "hate_speech"


def test_bad_decisions_name_the_problem_and_change_nothing(store):
    item = store.add_prediction("c", BORDERLINE, Source.TASK)
    unscored = store.add(
        NewItem(
            "d",
            [{"check": "quality", "severity": "review", "detail": "down"}],
            {},
            Source.STRATEGIST,
        )
    )[0]
    with pytest.raises(ItemNotFound):
        store.decide("0" * 24, "approve")
    with pytest.raises(UserError, match="approve or reject"):
        store.decide(item.item_id, "maybe")
    with pytest.raises(UserError, match="must be one of"):
        store.decide(item.item_id, "reject", label="neither")
    with pytest.raises(UserError, match="drop the label"):
        store.decide(item.item_id, "approve", label="hate_speech")
    with pytest.raises(UserError, match="no classifier labels"):
        store.decide(unscored.item_id, "reject")
    assert {i.status for i in store.list_items()} == {Status.PENDING}


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("text", "  ", "non-empty text"),
        ("video_id", "a\nb", "control"),
        ("channel", "x" * 201, "200"),
    ],
)
def test_bad_items_are_refused(field, value, problem):
    fields = {"text": "t", "reasons": [], "labels": {}, "source": Source.TASK, field: value}
    with pytest.raises(UserError, match=problem):
        NewItem(**fields)


def test_an_item_left_undecided_expires_once_and_can_still_be_decided(store):
    old = store.add_prediction("old", BORDERLINE, Source.TASK)
    store.add_prediction("new", BORDERLINE, Source.TASK)
    with store.engine.begin() as connection:  # created two hours ago
        connection.execute(
            review_store.items.update()
            .where(review_store.items.c.item_id == old.item_id)
            .values(created_at=time.time() - 7200)
        )
    assert store.counts(3600)["overdue"] == 1
    (expired,) = store.expire(after_seconds=3600)
    assert expired.item_id == old.item_id and expired.status is Status.EXPIRED
    assert store.expire(after_seconds=3600) == []  # once
    assert store.counts(3600)["overdue"] == 1  # still open, still overdue
    assert ("review.expired", old.item_id) in published(store)
    assert {i.item_id for i in store.list_items()} >= {old.item_id}  # never dropped
    assert store.decide(old.item_id, "approve").status is Status.APPROVED


def test_decided_items_are_labelled_training_rows(store):
    approved = store.add_prediction("fine really", BORDERLINE, Source.TASK)
    rejected = store.add_prediction("not fine", BORDERLINE, Source.TASK)
    store.add_prediction("undecided", BORDERLINE, Source.TASK)
    store.decide(approved.item_id, "approve")
    store.decide(rejected.item_id, "reject", label="hate_speech")
    rows = store.labelled_rows()
    assert rows.to_dict("records") == [
        {"item_id": approved.item_id, "text": "fine really", "label": 2},
        {"item_id": rejected.item_id, "text": "not fine", "label": 0},
    ]
