"""The human review queue: every text the quality gate sent to `review` kept for a person in
the shared SQL store (`Settings.backend_store`: SQLite locally, PostgreSQL in the cluster), the
person's decision on it, and the decisions as labelled rows for the next quality training.

- Items: the text, the gate's reasons, the classifier's labels and score, the channel, the
  video and the model version that scored it, and where the decision came from (`Source`).
- Dedupe: an item's id is a hash of its video id and text, so the same text for the same video
  (or the same text without a video) scored again is the same item: the first scoring is kept,
  and `seen` counts the scorings. An item already decided stays decided.
- Decisions: `approve` labels the text `neither`; `reject` labels it with the class the person
  names, else the classifier's most likely flagged class (hate speech or offensive language).
  Deciding an item that is already decided is `AlreadyDecided` (HTTP 409).
- Expiry: an item still undecided `Settings.review_expiry_hours` after it was created is marked
  `expired` by `expire` (once, whichever process gets there first) and escalated by an alert;
  it stays in the queue and can still be decided.
- Events: `review.created`, `review.decided` and `review.expired` go to the event bus
  (`contentml.events`) from whichever process made the change.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import pandas as pd
import sqlalchemy as sa

from contentml import events
from contentml.db import open_database, upsert
from contentml.errors import UserError
from contentml.settings import Settings
from training.data import TOXICITY_CLASSES

MAX_NAME = 200
"""Longest channel or video id an item keeps (as the cost ledger's)."""

MAX_NOTE = 2_000
"""Longest note a reviewer may leave with a decision."""

ID_CHARS = 24
"""Hex characters of an item's id: 96 bits of its key's SHA-256, no collision in any queue."""

LIST_LIMIT = 100
"""Items `list_items` returns unless asked for more."""

MAX_LIST_LIMIT = 1_000

NEITHER = "neither"
FLAGGED_CLASSES = tuple(c for c in TOXICITY_CLASSES if c != NEITHER)
"""The labels a rejected text can take."""


class Status(StrEnum):
    PENDING = "pending"
    """Waiting for a person."""
    EXPIRED = "expired"
    """Waited past `Settings.review_expiry_hours`: escalated, still waiting for a person."""
    APPROVED = "approved"
    REJECTED = "rejected"


OPEN_STATUSES = (Status.PENDING, Status.EXPIRED)
"""Statuses an item can still be decided from."""


class Decision(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"


DECIDED_STATUS = {Decision.APPROVE: Status.APPROVED, Decision.REJECT: Status.REJECTED}


class Source(StrEnum):
    """Where a `review` decision was made."""

    TASK = "task"  # POST /score/quality
    BATCH = "batch"  # a quality batch job's item
    V1 = "v1"  # /v1/models/quality:predict with a video id
    V2 = "v2"  # /v2/models/quality/infer with a video id
    STRATEGIST = "strategist"  # a script the ContentStrategist wrote


class ItemNotFound(UserError):
    """No review item has that id (HTTP 404)."""


class AlreadyDecided(UserError):
    """The item was decided before (HTTP 409)."""


def check_name(value: str | None, what: str) -> str | None:
    """A channel or video id as an item keeps it: None, or printable text of 1-`MAX_NAME`
    characters (a control character would forge lines in logs); `UserError` naming `what`."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{what} must be non-empty text, not {value!r:.80}")
    if len(value) > MAX_NAME:
        raise UserError(f"{what} must be at most {MAX_NAME} characters, not {len(value)}")
    if not value.isprintable():
        raise UserError(f"{what} must hold no control or unprintable characters")
    return value


metadata = sa.MetaData()

items = sa.Table(
    "review_items",
    metadata,
    sa.Column("item_id", sa.String(ID_CHARS), primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("reasons", sa.Text, nullable=False),  # JSON list of {check, severity, detail}
    sa.Column("labels", sa.Text, nullable=False),  # JSON {class: probability}; {} if unscored
    sa.Column("score", sa.Float),
    sa.Column("channel", sa.String(MAX_NAME)),
    sa.Column("video_id", sa.String(MAX_NAME)),
    sa.Column("model_version", sa.String(64)),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float, nullable=False),
    sa.Column("seen", sa.Integer, nullable=False),
    sa.Column("expired_at", sa.Float),
    sa.Column("decided_at", sa.Float),
    sa.Column("label", sa.String(32)),  # the training label a decision gave
    sa.Column("note", sa.String(MAX_NOTE)),
    sa.Index("review_items_status_created", "status", "created_at"),
)


@dataclass(frozen=True)
class NewItem:
    """A text the gate sent to review, as its scorer reports it."""

    text: str
    reasons: Sequence[Mapping[str, str]]
    labels: Mapping[str, float]
    """The classifier's probability per class; empty when the text could not be scored."""
    source: Source
    score: float | None = None
    channel: str | None = None
    video_id: str | None = None
    model_version: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise UserError("a review item needs a non-empty text")
        check_name(self.channel, "channel")
        check_name(self.video_id, "video_id")
        unknown = sorted(set(self.labels) - set(TOXICITY_CLASSES))
        if unknown:
            raise UserError(f"unknown labels {unknown}; known: {list(TOXICITY_CLASSES)}")

    @property
    def item_id(self) -> str:
        """The dedupe key: the same video id and text is the same item."""
        key = json.dumps([self.video_id, self.text])
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:ID_CHARS]

    @classmethod
    def from_prediction(
        cls,
        text: str,
        prediction: Mapping[str, Any],
        source: Source,
        channel: str | None = None,
        video_id: str | None = None,
    ) -> NewItem:
        """From the quality predictor's answer (`decision`, `score`, `labels`, `reasons`,
        `model_version`) to `text`."""
        version = prediction.get("model_version")
        return cls(
            text=text,
            reasons=list(prediction.get("reasons", ())),
            labels=dict(prediction.get("labels", {})),
            source=source,
            score=prediction.get("score"),
            channel=channel,
            video_id=video_id,
            model_version=None if version is None else str(version),
        )


@dataclass(frozen=True)
class ReviewItem:
    item_id: str
    text: str
    reasons: list[dict[str, str]]
    labels: dict[str, float]
    score: float | None
    channel: str | None
    video_id: str | None
    model_version: str | None
    source: str
    status: Status
    created_at: float
    """Unix time of its first scoring."""
    last_seen_at: float
    seen: int
    """Times the same text (for the same video) was sent to review."""
    expired_at: float | None
    decided_at: float | None
    label: str | None
    """The training label the decision gave (one of `TOXICITY_CLASSES`)."""
    note: str | None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}

    def flagged_label(self) -> str | None:
        """The flagged class the classifier found most likely; None when it did not score."""
        flagged = {c: p for c, p in self.labels.items() if c in FLAGGED_CLASSES}
        return max(flagged, key=flagged.__getitem__) if flagged else None


def _item(row: sa.Row) -> ReviewItem:
    values = row._asdict()
    return ReviewItem(
        **{
            **values,
            "reasons": json.loads(values["reasons"]),
            "labels": json.loads(values["labels"]),
            "status": Status(values["status"]),
        }
    )


def _event(item: ReviewItem) -> dict[str, Any]:
    """An item's event data: what a console lists, without the text (fetch it by id)."""
    return {
        "item_id": item.item_id,
        "status": item.status.value,
        "source": item.source,
        "video_id": item.video_id,
        "model_version": item.model_version,
        "score": item.score,
        "label": item.label,
    }


class ReviewStore:
    """The review queue in the database at `url`; safe to share between request threads,
    processes and replicas."""

    def __init__(self, url: str):
        self.engine = open_database(url, metadata)

    @classmethod
    def from_settings(cls, settings: Settings) -> ReviewStore:
        return cls(settings.backend_store)

    def close(self) -> None:
        self.engine.dispose()

    def add(self, new: NewItem) -> tuple[ReviewItem, bool]:
        """Queue `new`, or count one more scoring of the item it already is; returns the item
        and whether it was created."""
        now = time.time()
        row = {
            "item_id": new.item_id,
            "text": new.text,
            "reasons": json.dumps([dict(r) for r in new.reasons]),
            "labels": json.dumps({c: float(p) for c, p in new.labels.items()}),
            "score": None if new.score is None else float(new.score),
            "channel": new.channel,
            "video_id": new.video_id,
            "model_version": new.model_version,
            "source": new.source.value,
            "status": Status.PENDING.value,
            "created_at": now,
            "last_seen_at": now,
            "seen": 1,
        }
        with self.engine.begin() as connection:
            # RETURNING, not rowcount: psycopg's rowcount of a skipped INSERT is not 0.
            created = (
                connection.execute(
                    upsert(self.engine, items).on_conflict_do_nothing().returning(items.c.item_id),
                    row,
                ).first()
                is not None
            )
            if not created:
                connection.execute(
                    items.update()
                    .where(items.c.item_id == new.item_id)
                    .values(seen=items.c.seen + 1, last_seen_at=now)
                )
        item = self.get(new.item_id)
        if created:
            events.publish(events.EventKind.REVIEW_CREATED, _event(item), item.channel)
        return item, created

    def add_prediction(
        self,
        text: str,
        prediction: Mapping[str, Any],
        source: Source,
        channel: str | None = None,
        video_id: str | None = None,
    ) -> ReviewItem | None:
        """Queue `text` if the gate's `prediction` on it is `review`; None otherwise."""
        if prediction.get("decision") != "review":
            return None
        new = NewItem.from_prediction(text, prediction, source, channel, video_id)
        return self.add(new)[0]

    def get(self, item_id: str) -> ReviewItem:
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(items).where(items.c.item_id == item_id)
            ).one_or_none()
        if row is None:
            raise ItemNotFound(f"no review item {item_id!r}")
        return _item(row)

    def list_items(
        self,
        status: Status | None = None,
        channel: str | None = None,
        limit: int = LIST_LIMIT,
    ) -> list[ReviewItem]:
        """Items, oldest first (the queue's order); `status` None lists the open ones
        (pending and expired)."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise UserError(f"limit must be 1-{MAX_LIST_LIMIT}, not {limit}")
        statuses = OPEN_STATUSES if status is None else (Status(status),)
        query = sa.select(items).where(items.c.status.in_([s.value for s in statuses]))
        if channel is not None:
            query = query.where(items.c.channel == channel)
        query = query.order_by(items.c.created_at, items.c.item_id).limit(limit)
        with self.engine.connect() as connection:
            return [_item(row) for row in connection.execute(query)]

    def decide(
        self,
        item_id: str,
        decision: Decision | str,
        label: str | None = None,
        note: str | None = None,
    ) -> ReviewItem:
        """A person's decision: approve (labelled `neither`) or reject (labelled `label`, else
        the classifier's most likely flagged class). `ItemNotFound`, `AlreadyDecided`, or
        `UserError` naming a bad decision, label or note."""
        try:
            decision = Decision(decision)
        except ValueError:
            raise UserError(f"decision must be approve or reject, not {decision!r:.40}") from None
        if note is not None and len(note) > MAX_NOTE:
            raise UserError(f"note must be at most {MAX_NOTE} characters, not {len(note)}")
        item = self.get(item_id)
        if item.status not in OPEN_STATUSES:
            raise AlreadyDecided(_decided(item))
        label = _label(item, decision, label)
        with self.engine.begin() as connection:
            # Only an open item changes: of two people deciding at once, one wins.
            changed = connection.execute(
                items.update()
                .where(
                    items.c.item_id == item_id,
                    items.c.status.in_([s.value for s in OPEN_STATUSES]),
                )
                .values(
                    status=DECIDED_STATUS[decision].value,
                    label=label,
                    note=note,
                    decided_at=time.time(),
                )
            ).rowcount
        item = self.get(item_id)
        if not changed:
            raise AlreadyDecided(_decided(item))
        events.publish(events.EventKind.REVIEW_DECIDED, _event(item), item.channel)
        return item

    def expire(self, after_seconds: float, now: float | None = None) -> list[ReviewItem]:
        """Mark the pending items created more than `after_seconds` ago `expired` and publish
        `review.expired` for each; an item expires once, in whichever process marks it."""
        now = time.time() if now is None else now
        due = sa.select(items.c.item_id).where(
            items.c.status == Status.PENDING.value, items.c.created_at < now - after_seconds
        )
        with self.engine.connect() as connection:
            candidates = list(connection.scalars(due.order_by(items.c.created_at)))
        expired = []
        for item_id in candidates:
            with self.engine.begin() as connection:
                marked = connection.execute(
                    items.update()
                    .where(items.c.item_id == item_id, items.c.status == Status.PENDING.value)
                    .values(status=Status.EXPIRED.value, expired_at=now)
                ).rowcount
            if marked:
                item = self.get(item_id)
                events.publish(events.EventKind.REVIEW_EXPIRED, _event(item), item.channel)
                expired.append(item)
        return expired

    def counts(self, overdue_after_seconds: float, now: float | None = None) -> dict[str, int]:
        """Items per status, and `overdue`: those open longer than `overdue_after_seconds`
        (expired or not yet marked so), which the escalation alert watches."""
        now = time.time() if now is None else now
        open_values = [s.value for s in OPEN_STATUSES]
        with self.engine.connect() as connection:
            found = dict(
                connection.execute(
                    sa.select(items.c.status, sa.func.count()).group_by(items.c.status)
                ).all()
            )
            overdue = connection.execute(
                sa.select(sa.func.count()).where(
                    items.c.status.in_(open_values),
                    items.c.created_at < now - overdue_after_seconds,
                )
            ).scalar_one()
        return {**{s.value: int(found.get(s.value, 0)) for s in Status}, "overdue": int(overdue)}

    def labelled_rows(self) -> pd.DataFrame:
        """The decided items as training rows: `item_id`, `text`, `label` (the class code,
        0-2, as `training.data.load_toxicity` gives), oldest decision first."""
        query = (
            sa.select(items.c.item_id, items.c.text, items.c.label)
            .where(items.c.status.in_([Status.APPROVED.value, Status.REJECTED.value]))
            .order_by(items.c.decided_at, items.c.item_id)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return pd.DataFrame(
            {
                "item_id": [r.item_id for r in rows],
                "text": [r.text for r in rows],
                "label": pd.Series([TOXICITY_CLASSES.index(r.label) for r in rows], dtype="int64"),
            }
        )


def _decided(item: ReviewItem) -> str:
    return f"review item {item.item_id} was already decided: {item.status.value} ({item.label})"


def _label(item: ReviewItem, decision: Decision, label: str | None) -> str:
    """The training label of a decision; see the module docstring."""
    if decision is Decision.APPROVE:
        if label not in (None, NEITHER):
            raise UserError(f"an approved text is labelled {NEITHER}; drop the label {label!r}")
        return NEITHER
    if label is None:
        label = item.flagged_label()
        if label is None:
            raise UserError(
                f"review item {item.item_id} has no classifier labels: name the label to "
                f"reject it with, one of {list(FLAGGED_CLASSES)}"
            )
    if label not in FLAGGED_CLASSES:
        raise UserError(f"a rejected text's label must be one of {list(FLAGGED_CLASSES)}")
    return label
