"""Batch jobs for non-urgent work (> 100 items): `POST /batch/{task}` stores a job and queues
its chunks; `contentml batch worker` processes answer them with the task routes' own code
(`serving/backend/tasks.py`), loading the models in-process, so urgent single requests on the model
servers never wait behind batch work.

- **Queue.** huey (`Settings.batch_queue`): SQLite locally, Redis in the cluster; `urgent` jobs
  are dequeued before `bulk` ones (huey priorities), a failed chunk is retried with exponential
  backoff (`RETRIES`, `RETRY_DELAY_SECONDS` doubling). Messages are JSON (`JsonSerializer`),
  never pickles: writing to the queue does not run code in the workers.
- **Store.** Jobs, items, results and the dead-letter queue are tables in
  `Settings.backend_store` (SQLite locally, PostgreSQL in the cluster). A result is keyed by
  (job, item id) and written at most once; an item is in the results or in the dead letters,
  never both, so a job's counts are exact.
- **Nothing lost.** huey forgets a message once a worker takes it, so the store tracks each
  chunk: a worker claims it, heartbeats while alive, and marks it done. A chunk claimed by a
  worker whose heartbeat stopped (killed) is queued again by the other workers' reaper, and
  dead-lettered once it has been tried `RETRIES + 1` times; a chunk that sat queued but is no
  longer in the queue (a worker died between taking and claiming it) is queued again too.
- **Failures.** An item the model refuses (bad input) is dead-lettered at once with the reason;
  a chunk that fails otherwise is retried, then its unanswered items are dead-lettered with the
  last error. `contentml batch dlq retry` queues dead-lettered items again. A job ends `done`
  when every item is answered or dead-lettered and at least one was answered, `failed` when
  none was (with the reasons).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import pydantic
import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query
from huey import PriorityRedisHuey, SqliteHuey
from huey.api import Huey
from huey.registry import Message
from huey.serializer import Serializer
from kserve.errors import InvalidInput

from contentml.db import open_database, upsert
from contentml.errors import UserError
from contentml.settings import Settings
from serving.backend.costs import BookedName, CostEntry, CostLedger, compute_cost
from serving.backend.tasks import MAX_BODY_BYTES, TASKS, UNASSIGNED_CHANNEL, Task, TaskAnswerer

logger = logging.getLogger(__name__)

MAX_ITEMS = 10_000
"""Items per job; a larger batch is split by the caller."""

MAX_OPEN_ITEMS_PER_CHANNEL = 50_000
"""Items a channel (the caller a job is booked to; jobs without one share `unassigned`) may
have waiting or running at once: a submission beyond it gets 429, so that one caller cannot
fill the queue ahead of every other."""

FULL_RETRY_AFTER_SECONDS = 60
"""What a caller over its share is told to wait: chunks finish in seconds to minutes."""

MAX_BATCH_BODY_BYTES = 64 * MAX_BODY_BYTES
"""1,000 trend items with a month of history each are about 10 MB."""

CHUNK_SIZE = {Task.TREND: 50, Task.QUALITY: 16, Task.SCRIPT: 1}
"""Items a worker answers in one model call: big enough to amortize the call, small enough
that a lost worker costs little to redo (a script is one long generation)."""

RETRIES = 3
"""Retries of a failed chunk before its items are dead-lettered."""

RETRY_DELAY_SECONDS = 1.0
"""The first retry's delay; each next one waits twice as long."""

HEARTBEAT_SECONDS = 2.0
"""How often a worker says it is alive (and reaps the chunks of workers that are not)."""

STALE_AFTER_SECONDS = 10.0
"""A worker silent this long is gone: its claimed chunks are queued again."""

LOST_MESSAGE_SECONDS = 60.0
"""A chunk queued this long but no longer in the queue nor claimed lost its message."""

MAX_ID_CHARS = 200

MAX_LISTED_JOBS = 500
"""Jobs one listing returns at most, each a report of a few queries."""


class Priority(StrEnum):
    BULK = "bulk"
    URGENT = "urgent"


HUEY_PRIORITY = {Priority.BULK: 0, Priority.URGENT: 10}
"""huey dequeues higher numbers first."""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


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


# --- requests ------------------------------------------------------------------------------


class BatchRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = pydantic.Field(
        min_length=1,
        max_length=MAX_ITEMS,
        description="Each item: a unique `id` and the body of the task's route.",
    )
    priority: Priority = Priority.BULK
    channel: BookedName | None = pydantic.Field(
        None, max_length=MAX_ID_CHARS, description="Channel the cost is booked to."
    )


class OverCapacity(UserError):
    """A submission that would take a caller over `MAX_OPEN_ITEMS_PER_CHANNEL`."""


class JobAccepted(pydantic.BaseModel):
    job_id: str
    status: JobStatus
    total: int


class JobReport(pydantic.BaseModel):
    job_id: str
    task: Task
    priority: Priority
    channel: str
    created_at: float
    status: JobStatus
    total: int
    succeeded: int
    failed: int
    errors: list[str] = pydantic.Field(description="Distinct reasons items were dead-lettered.")


class ItemResult(pydantic.BaseModel):
    id: str
    result: dict[str, Any]


class DeadLetter(pydantic.BaseModel):
    job_id: str
    id: str
    error: str


def parse_items(task: Task, raw: Sequence[Any]) -> list[tuple[str, pydantic.BaseModel]]:
    """(id, validated body) per item; the first bad one raises `UserError` naming it."""
    body_type = TASKS[task].body
    parsed: list[tuple[str, pydantic.BaseModel]] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise UserError(f"items[{index}] must be an object with an id, not {item!r:.80}")
        item_id = item.get("id")
        if not isinstance(item_id, str) or not 1 <= len(item_id) <= MAX_ID_CHARS:
            raise UserError(f"items[{index}].id must be a string of 1-{MAX_ID_CHARS} characters")
        if item_id in seen:
            raise UserError(f"items[{index}].id {item_id!r} is repeated: ids must be unique")
        seen.add(item_id)
        try:
            body = body_type.model_validate({k: v for k, v in item.items() if k != "id"})
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'item'}: {err['msg']}" for err in e.errors()
            )
            raise UserError(f"items[{index}] (id {item_id!r}): {problems}") from e
        parsed.append((item_id, body))
    return parsed


# --- the store -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A chunk a worker took: the items still unanswered, and how often it was taken."""

    job_id: str
    task: Task
    channel: str
    attempts: int
    items: list[tuple[str, pydantic.BaseModel]]


@dataclass(frozen=True)
class Requeue:
    """A chunk to put in the queue (again)."""

    job_id: str
    chunk: int
    priority: Priority


class JobStore:
    """Jobs, chunks, results and dead letters in the database at `url`."""

    def __init__(self, url: str):
        self.engine = open_database(url, metadata)

    def close(self) -> None:
        self.engine.dispose()

    def create(
        self,
        task: Task,
        parsed: Sequence[tuple[str, pydantic.BaseModel]],
        priority: Priority,
        channel: str | None,
    ) -> tuple[str, list[Requeue]]:
        """Store a job and its items; returns its id and the chunks to queue."""
        job_id = uuid.uuid4().hex
        size = CHUNK_SIZE[task]
        now = time.time()
        count = (len(parsed) + size - 1) // size
        with self.engine.begin() as connection:
            connection.execute(
                jobs.insert().values(
                    job_id=job_id,
                    task=task.value,
                    priority=priority.value,
                    channel=channel or UNASSIGNED_CHANNEL,
                    total=len(parsed),
                    created_at=now,
                )
            )
            connection.execute(
                items.insert(),
                [
                    {
                        "job_id": job_id,
                        "item_id": item_id,
                        "position": position,
                        "chunk": position // size,
                        "body": body.model_dump_json(),
                    }
                    for position, (item_id, body) in enumerate(parsed)
                ],
            )
            connection.execute(
                chunks.insert(),
                [
                    {"job_id": job_id, "chunk": c, "state": ChunkState.QUEUED, "changed_at": now}
                    for c in range(count)
                ],
            )
        return job_id, [Requeue(job_id, c, priority) for c in range(count)]

    def open_items(self, channel: str) -> int:
        """Items of `channel`'s jobs in chunks not done yet (answered ones of a running chunk
        included: a bound, counted from the small chunks table)."""
        query = (
            sa.select(sa.func.count())
            .select_from(items)
            .join(chunks, (chunks.c.job_id == items.c.job_id) & (chunks.c.chunk == items.c.chunk))
            .join(jobs, jobs.c.job_id == items.c.job_id)
            .where(jobs.c.channel == channel, chunks.c.state != ChunkState.DONE)
        )
        with self.engine.connect() as connection:
            return connection.scalar(query)

    def delete(self, job_id: str) -> None:
        with self.engine.begin() as connection:
            for table in (dead_letters, results, chunks, items, jobs):
                connection.execute(table.delete().where(table.c.job_id == job_id))

    def claim(self, job_id: str, chunk: int, worker: str) -> Claim | None:
        """Take a chunk that is not done; None when it is (or its job is gone)."""
        where = (chunks.c.job_id == job_id) & (chunks.c.chunk == chunk)
        with self.engine.begin() as connection:
            taken = connection.execute(
                chunks.update()
                .where(where & (chunks.c.state != ChunkState.DONE))
                .values(
                    state=ChunkState.CLAIMED,
                    attempts=chunks.c.attempts + 1,
                    worker=worker,
                    changed_at=time.time(),
                )
                .returning(chunks.c.attempts)
            ).one_or_none()
            if taken is None:
                return None
            job = connection.execute(sa.select(jobs).where(jobs.c.job_id == job_id)).one()
            answered = sa.union(
                sa.select(results.c.item_id).where(results.c.job_id == job_id),
                sa.select(dead_letters.c.item_id).where(dead_letters.c.job_id == job_id),
            )
            rows = connection.execute(
                sa.select(items.c.item_id, items.c.body)
                .where(items.c.job_id == job_id, items.c.chunk == chunk)
                .where(items.c.item_id.not_in(answered))
                .order_by(items.c.position)
            ).all()
        task = Task(job.task)
        body_type = TASKS[task].body
        return Claim(
            job_id,
            task,
            job.channel,
            taken.attempts,
            [(row.item_id, body_type.model_validate_json(row.body)) for row in rows],
        )

    def save_results(self, job_id: str, answers: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Write each item's result once: a repeated answer (a chunk redone) is dropped."""
        rows = [
            {"job_id": job_id, "item_id": item_id, "result": json.dumps(answer), "at": time.time()}
            for item_id, answer in answers
        ]
        if not rows:
            return
        with self.engine.begin() as connection:
            connection.execute(upsert(self.engine, results).on_conflict_do_nothing(), rows)
            connection.execute(
                dead_letters.delete().where(
                    dead_letters.c.job_id == job_id,
                    dead_letters.c.item_id.in_([row["item_id"] for row in rows]),
                )
            )

    def dead_letter(self, job_id: str, failures: Iterable[tuple[str, str]]) -> None:
        """Dead-letter items with their errors, unless an answer was written meanwhile."""
        failures = list(failures)
        if not failures:
            return
        with self.engine.begin() as connection:
            answered = set(
                connection.scalars(
                    sa.select(results.c.item_id).where(
                        results.c.job_id == job_id,
                        results.c.item_id.in_([item_id for item_id, _ in failures]),
                    )
                )
            )
            rows = [
                {"job_id": job_id, "item_id": item_id, "error": error[:2000], "at": time.time()}
                for item_id, error in failures
                if item_id not in answered
            ]
            if rows:
                connection.execute(upsert(self.engine, dead_letters).on_conflict_do_nothing(), rows)

    def set_chunk(self, job_id: str, chunk: int, state: ChunkState) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                chunks.update()
                .where(chunks.c.job_id == job_id, chunks.c.chunk == chunk)
                .values(state=state, worker=None, changed_at=time.time())
            )

    # --- workers -------------------------------------------------------------------------

    def heartbeat(self, worker: str) -> None:
        with self.engine.begin() as connection:
            updated = connection.execute(
                workers.update().where(workers.c.worker == worker).values(heartbeat_at=time.time())
            ).rowcount
            if not updated:
                connection.execute(workers.insert().values(worker=worker, heartbeat_at=time.time()))

    def retire(self, worker: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(workers.delete().where(workers.c.worker == worker))

    def live_workers(self, stale_after: float = STALE_AFTER_SECONDS) -> list[str]:
        """Workers that beat within `stale_after` seconds."""
        with self.engine.connect() as connection:
            return list(
                connection.scalars(
                    sa.select(workers.c.worker).where(
                        workers.c.heartbeat_at >= time.time() - stale_after
                    )
                )
            )

    def abandoned(self, stale_after: float) -> list[tuple[str, int, str, int]]:
        """(job, chunk, worker, attempts) of chunks claimed by workers silent `stale_after`."""
        alive = sa.select(workers.c.worker).where(
            workers.c.heartbeat_at >= time.time() - stale_after
        )
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(chunks.c.job_id, chunks.c.chunk, chunks.c.worker, chunks.c.attempts)
                .where(chunks.c.state == ChunkState.CLAIMED)
                .where(chunks.c.worker.not_in(alive))
            ).all()
        return [tuple(row) for row in rows]

    def take_over(self, job_id: str, chunk: int, worker: str) -> bool:
        """Release a dead worker's chunk; False when another reaper (or the worker) was first."""
        with self.engine.begin() as connection:
            return bool(
                connection.execute(
                    chunks.update()
                    .where(chunks.c.job_id == job_id, chunks.c.chunk == chunk)
                    .where(chunks.c.state == ChunkState.CLAIMED, chunks.c.worker == worker)
                    .values(state=ChunkState.QUEUED, worker=None, changed_at=time.time())
                ).rowcount
            )

    def waiting_since(self, before: float) -> list[Requeue]:
        """Queued chunks not touched since `before`, with their jobs' priorities."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(chunks.c.job_id, chunks.c.chunk, jobs.c.priority)
                .join(jobs, jobs.c.job_id == chunks.c.job_id)
                .where(chunks.c.state == ChunkState.QUEUED, chunks.c.changed_at < before)
            ).all()
        return [Requeue(row.job_id, row.chunk, Priority(row.priority)) for row in rows]

    def touch(self, job_id: str, chunk: int) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                chunks.update()
                .where(chunks.c.job_id == job_id, chunks.c.chunk == chunk)
                .values(changed_at=time.time())
            )

    def priority(self, job_id: str) -> Priority:
        with self.engine.connect() as connection:
            return Priority(
                connection.scalar(sa.select(jobs.c.priority).where(jobs.c.job_id == job_id))
            )

    # --- reading -------------------------------------------------------------------------

    def report(self, job_id: str) -> JobReport:
        with self.engine.connect() as connection:
            job = connection.execute(sa.select(jobs).where(jobs.c.job_id == job_id)).one_or_none()
            if job is None:
                raise UserError(f"no batch job {job_id!r}")
            succeeded = connection.scalar(
                sa.select(sa.func.count()).select_from(results).where(results.c.job_id == job_id)
            )
            errors = list(
                connection.scalars(
                    sa.select(dead_letters.c.error)
                    .where(dead_letters.c.job_id == job_id)
                    .group_by(dead_letters.c.error)
                    .order_by(sa.func.count().desc())
                    .limit(10)
                )
            )
            failed = connection.scalar(
                sa.select(sa.func.count())
                .select_from(dead_letters)
                .where(dead_letters.c.job_id == job_id)
            )
            started = connection.scalar(
                sa.select(sa.func.count())
                .select_from(chunks)
                .where(chunks.c.job_id == job_id, chunks.c.attempts > 0)
            )
        if succeeded + failed >= job.total:
            status = JobStatus.DONE if succeeded else JobStatus.FAILED
        else:
            status = JobStatus.RUNNING if started or succeeded or failed else JobStatus.QUEUED
        return JobReport(
            job_id=job_id,
            task=Task(job.task),
            priority=Priority(job.priority),
            channel=job.channel,
            created_at=job.created_at,
            status=status,
            total=job.total,
            succeeded=succeeded,
            failed=failed,
            errors=errors,
        )

    def recent(self, limit: int, channel: str | None = None) -> list[JobReport]:
        """The `limit` newest jobs, of `channel` alone if given."""
        query = sa.select(jobs.c.job_id).order_by(jobs.c.created_at.desc()).limit(limit)
        if channel is not None:
            query = query.where(jobs.c.channel == channel)
        with self.engine.connect() as connection:
            job_ids = list(connection.scalars(query))
        return [self.report(job_id) for job_id in job_ids]

    def results(self, job_id: str) -> list[ItemResult]:
        self.report(job_id)  # an unknown job is an error, not an empty list
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(results.c.item_id, results.c.result)
                .join(
                    items,
                    (items.c.job_id == results.c.job_id) & (items.c.item_id == results.c.item_id),
                )
                .where(results.c.job_id == job_id)
                .order_by(items.c.position)
            ).all()
        return [ItemResult(id=row.item_id, result=json.loads(row.result)) for row in rows]

    def dead_letters(self, job_id: str | None = None) -> list[DeadLetter]:
        query = sa.select(dead_letters).order_by(dead_letters.c.at, dead_letters.c.item_id)
        if job_id is not None:
            query = query.where(dead_letters.c.job_id == job_id)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [DeadLetter(job_id=r.job_id, id=r.item_id, error=r.error) for r in rows]

    def release_dead_letters(
        self, job_id: str | None = None, item_ids: Sequence[str] = ()
    ) -> tuple[int, list[Requeue]]:
        """Take items out of the dead letters (all, a job's, or the given ids of a job) and
        reopen their chunks; returns how many items, and the chunks to queue."""
        where = sa.true()
        if job_id is not None:
            where = dead_letters.c.job_id == job_id
        if item_ids:
            where = where & dead_letters.c.item_id.in_(list(item_ids))
        with self.engine.begin() as connection:
            released = connection.execute(
                sa.select(dead_letters.c.job_id, items.c.chunk, jobs.c.priority)
                .join(
                    items,
                    (items.c.job_id == dead_letters.c.job_id)
                    & (items.c.item_id == dead_letters.c.item_id),
                )
                .join(jobs, jobs.c.job_id == dead_letters.c.job_id)
                .where(where)
            ).all()
            connection.execute(dead_letters.delete().where(where))
            reopened = sorted({(row.job_id, row.chunk, row.priority) for row in released})
            for job, chunk, _ in reopened:
                connection.execute(
                    chunks.update()
                    .where(chunks.c.job_id == job, chunks.c.chunk == chunk)
                    .values(
                        state=ChunkState.QUEUED, attempts=0, worker=None, changed_at=time.time()
                    )
                )
        return len(released), [Requeue(j, c, Priority(p)) for j, c, p in reopened]


# --- the queue -----------------------------------------------------------------------------


_DATETIME = "__datetime__"
_TIMEDELTA = "__timedelta__"
_MESSAGE = "__huey_message__"


def _to_json(value: Any) -> Any:
    """`value` as JSON can carry it: huey's `Message` tuples (nested for pipelines),
    datetimes (a retry's `eta`) and timedeltas (`expires`) tagged, tuples as lists."""
    if isinstance(value, Message):
        return {_MESSAGE: {k: _to_json(v) for k, v in value._asdict().items()}}
    if isinstance(value, datetime.datetime):
        return {_DATETIME: value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {_TIMEDELTA: value.total_seconds()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"a batch queue message cannot carry a {type(value).__name__}: {value!r:.80}")


def _from_json(found: dict[str, Any]) -> Any:
    if _MESSAGE in found:
        return Message(**found[_MESSAGE])
    if _DATETIME in found:
        return datetime.datetime.fromisoformat(found[_DATETIME])
    if _TIMEDELTA in found:
        return datetime.timedelta(seconds=found[_TIMEDELTA])
    return found


class JsonSerializer(Serializer):
    """huey's messages as JSON instead of pickle: a worker unpickling what it dequeues would
    run any code that whoever can write to the queue (Redis, the SQLite file) put there. A
    message that is not this JSON fails to decode: huey's consumer logs it and drops it, and the
    reaper queues its chunk again (`LOST_MESSAGE_SECONDS`)."""

    def _serialize(self, data: Any) -> bytes:
        return json.dumps(_to_json(data), separators=(",", ":")).encode()

    def _deserialize(self, data: bytes) -> Any:
        return json.loads(data, object_hook=_from_json)


def make_huey(url: str) -> Huey:
    """The huey instance `url` names: `sqlite:///<file>` or `redis://host:port/db`."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return SqliteHuey(
            "contentml-batch",
            filename=path,
            results=False,
            timeout=10,
            serializer=JsonSerializer(),
        )
    return PriorityRedisHuey("contentml-batch", url=url, results=False, serializer=JsonSerializer())


class BatchQueue:
    """Submitting jobs (the API, the CLI) and running their chunks (`contentml batch worker`)
    over one store and one huey queue."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore | None = None,
        answerer: TaskAnswerer | None = None,
        ledger: CostLedger | None = None,
    ):
        """`answerer` is given in workers only: the API never runs a chunk."""
        self.settings = settings
        self.store = store or JobStore(settings.backend_store)
        self.answerer = answerer
        self.ledger = ledger
        self.huey = make_huey(settings.batch_queue)
        self.worker = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.run_chunk = self.huey.task(
            retries=RETRIES,
            retry_delay=RETRY_DELAY_SECONDS,
            retry_backoff=2,
            context=True,
            name="contentml.batch.run_chunk",
        )(self._run_chunk)

    def close(self) -> None:
        self.store.close()

    # --- submitting ----------------------------------------------------------------------

    def submit(self, task: Task, request: BatchRequest) -> JobAccepted:
        """Store the job and queue its chunks; `UserError` names a bad item, `OverCapacity` a
        caller with too much work queued already."""
        parsed = parse_items(task, request.items)
        channel = request.channel or UNASSIGNED_CHANNEL
        open_items = self.store.open_items(channel)
        if open_items + len(parsed) > MAX_OPEN_ITEMS_PER_CHANNEL:
            raise OverCapacity(
                f"channel {channel!r} has {open_items} batch items waiting or running: "
                f"{len(parsed)} more would pass its {MAX_OPEN_ITEMS_PER_CHANNEL}; "
                f"retry after {FULL_RETRY_AFTER_SECONDS} s"
            )
        job_id, queued = self.store.create(task, parsed, request.priority, request.channel)
        try:
            self.enqueue(queued)
        except Exception:
            self.store.delete(job_id)  # a job nobody will run must not be reported queued
            raise
        return JobAccepted(job_id=job_id, status=JobStatus.QUEUED, total=len(parsed))

    def enqueue(self, queued: Iterable[Requeue]) -> None:
        for requeue in queued:
            self.huey.enqueue(
                self.run_chunk.s(
                    requeue.job_id, requeue.chunk, priority=HUEY_PRIORITY[requeue.priority]
                )
            )

    def retry_dead_letters(self, job_id: str | None = None, item_ids: Sequence[str] = ()) -> int:
        count, queued = self.store.release_dead_letters(job_id, item_ids)
        self.enqueue(queued)
        return count

    # --- running -------------------------------------------------------------------------

    def _run_chunk(self, job_id: str, chunk: int, task=None) -> None:
        """One chunk (huey calls this in a worker): answer the unanswered items and store the
        answers; raising makes huey retry it, the last failure dead-letters its items."""
        if self.answerer is None:
            raise RuntimeError("only a batch worker runs chunks")
        claim = self.store.claim(job_id, chunk, self.worker)
        if claim is None:
            return  # done by another worker, or its job was deleted
        started = time.perf_counter()
        try:
            self._answer(claim)
        except Exception as e:
            if task is not None and task.retries > 0:
                self.store.set_chunk(job_id, chunk, ChunkState.QUEUED)
                raise
            logger.error("batch job %s chunk %d failed for good: %s", job_id, chunk, e)
            self.store.dead_letter(
                job_id, [(i, f"{type(e).__name__}: {e}") for i, _ in claim.items]
            )
        finally:
            self._book(claim, time.perf_counter() - started)
        self.store.set_chunk(job_id, chunk, ChunkState.DONE)

    def _answer(self, claim: Claim) -> None:
        if not claim.items:
            return
        bodies = [body for _, body in claim.items]
        try:
            answers = self.answerer.answer(claim.task, bodies, claim.channel)
        except InvalidInput:
            # One bad item fails a model call: answer one by one to find it.
            self._answer_one_by_one(claim)
            return
        self.store.save_results(
            claim.job_id, zip((i for i, _ in claim.items), answers, strict=True)
        )

    def _answer_one_by_one(self, claim: Claim) -> None:
        for item_id, body in claim.items:
            try:
                (answer,) = self.answerer.answer(claim.task, [body], claim.channel)
            except InvalidInput as e:
                self.store.dead_letter(claim.job_id, [(item_id, f"invalid input: {e}")])
                continue
            self.store.save_results(claim.job_id, [(item_id, answer)])

    def _book(self, claim: Claim, seconds: float) -> None:
        """A chunk's compute, on its job's channel (a script's cost is booked per call)."""
        if self.ledger is None or claim.task is Task.SCRIPT or not claim.items:
            return
        self.ledger.record(
            CostEntry(
                channel=claim.channel,
                kind=f"batch:{claim.task}",
                usd=compute_cost(seconds, self.settings.compute_usd_per_hour),
                compute_seconds=seconds,
                job_id=claim.job_id,
            )
        )

    # --- keeping workers honest ------------------------------------------------------------

    def reap(self) -> int:
        """Queue again the chunks of dead workers and chunks whose message was lost;
        dead-letter those tried too often. Returns the chunks handled."""
        handled = 0
        for job_id, chunk, worker, attempts in self.store.abandoned(STALE_AFTER_SECONDS):
            if not self.store.take_over(job_id, chunk, worker):
                continue
            handled += 1
            if attempts > RETRIES:
                claim = self.store.claim(job_id, chunk, self.worker)
                if claim is not None:
                    error = f"worker lost while answering, {attempts} times (last: {worker})"
                    self.store.dead_letter(job_id, [(i, error) for i, _ in claim.items])
                    self.store.set_chunk(job_id, chunk, ChunkState.DONE)
                continue
            logger.warning(
                "worker %s is gone: queueing job %s chunk %d again", worker, job_id, chunk
            )
            self.enqueue([Requeue(job_id, chunk, self.store.priority(job_id))])
        waiting = self.store.waiting_since(time.time() - LOST_MESSAGE_SECONDS)
        if waiting:
            in_queue = {
                tuple(t.args) for t in self.huey.pending() + self.huey.scheduled() if t.args
            }
            for requeue in waiting:
                self.store.touch(requeue.job_id, requeue.chunk)
                if (requeue.job_id, requeue.chunk) not in in_queue:
                    handled += 1
                    logger.warning(
                        "job %s chunk %d lost its queue message: queueing it again",
                        requeue.job_id,
                        requeue.chunk,
                    )
                    self.enqueue([requeue])
        return handled


class Heartbeat(threading.Thread):
    """A worker's pulse: says it is alive and reaps the chunks of workers that are not."""

    def __init__(self, queue: BatchQueue, every: float = HEARTBEAT_SECONDS):
        super().__init__(name="batch-heartbeat", daemon=True)
        self.queue = queue
        self.every = every
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.store.heartbeat(self.queue.worker)
                self.queue.reap()
            except Exception as e:  # a database hiccup must not end the pulse
                logger.warning("batch heartbeat failed: %s", e)
            self.stopped.wait(self.every)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        self.queue.store.retire(self.queue.worker)


def batch_router(queue: BatchQueue) -> APIRouter:
    """`POST /batch/{task}`, `GET /batch/jobs/{id}` and `GET /batch/jobs/{id}/results`, and
    the listing of every caller's jobs, `GET /batch/jobs` (an admin route)."""
    router = APIRouter(prefix="/batch", tags=["batch"])

    def listing(
        limit: Annotated[int, Query(ge=1, le=MAX_LISTED_JOBS)] = 50,
        channel: Annotated[BookedName | None, Query(max_length=MAX_ID_CHARS)] = None,
    ) -> list[JobReport]:
        return queue.store.recent(limit, channel)

    def submit(task: Task, request: BatchRequest) -> JobAccepted:
        try:
            return queue.submit(task, request)
        except OverCapacity as e:
            raise HTTPException(429, str(e), {"Retry-After": str(FULL_RETRY_AFTER_SECONDS)}) from e
        except UserError as e:
            raise HTTPException(422, str(e)) from e

    def status(job_id: str) -> JobReport:
        try:
            return queue.store.report(job_id)
        except UserError as e:
            raise HTTPException(404, str(e)) from e

    def job_results(job_id: str) -> list[ItemResult]:
        try:
            return queue.store.results(job_id)
        except UserError as e:
            raise HTTPException(404, str(e)) from e

    router.add_api_route(
        "/{task}",
        submit,
        methods=["POST"],
        status_code=202,
        max_body_size=MAX_BATCH_BODY_BYTES,
        summary="Submit a batch job (answered by the batch workers)",
    )
    router.add_api_route("/jobs", listing, methods=["GET"], summary="The newest jobs (admin)")
    router.add_api_route("/jobs/{job_id}", status, methods=["GET"])
    router.add_api_route("/jobs/{job_id}/results", job_results, methods=["GET"])
    return router
