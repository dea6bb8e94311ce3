"""The batch store's tables (one SQLAlchemy `metadata`): jobs, their items, the chunks the
workers claim, results, dead letters and the workers' heartbeats."""

from __future__ import annotations

from enum import StrEnum

import sqlalchemy as sa

MAX_ID_CHARS = 200
"""The longest job item id (and channel name) the tables hold."""


class ChunkState(StrEnum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    DONE = "done"


metadata = sa.MetaData()

jobs = sa.Table(
    "batch_jobs",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("task", sa.String(16), nullable=False),
    sa.Column("priority", sa.String(16), nullable=False),
    sa.Column("channel", sa.String(MAX_ID_CHARS), nullable=False),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

items = sa.Table(
    "batch_items",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("item_id", sa.String(MAX_ID_CHARS), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("chunk", sa.Integer, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("batch_items_chunk", "job_id", "chunk"),
)

chunks = sa.Table(
    "batch_chunks",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("chunk", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker", sa.String(128)),
    sa.Column("changed_at", sa.Float, nullable=False),
    sa.Index("batch_chunks_state", "state"),
)

results = sa.Table(
    "batch_results",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("item_id", sa.String(MAX_ID_CHARS), primary_key=True),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

dead_letters = sa.Table(
    "batch_dead_letters",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("item_id", sa.String(MAX_ID_CHARS), primary_key=True),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

workers = sa.Table(
    "batch_workers",
    metadata,
    sa.Column("worker", sa.String(128), primary_key=True),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)
