"""The batch job store: jobs, their items and chunks, results, dead letters and the workers'
heartbeats in `Settings.backend_store` (SQLite locally, PostgreSQL in the cluster)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
import sqlalchemy as sa

from contentml.db import open_database, upsert
from contentml.errors import UserError
from serving.backend.batch.models import DeadLetter, ItemResult, JobReport, JobStatus, Priority
from serving.backend.batch.schema import (
    ChunkState,
    chunks,
    dead_letters,
    items,
    jobs,
    metadata,
    results,
    workers,
)
from serving.backend.tasks import TASKS, UNASSIGNED_CHANNEL, Task

CHUNK_SIZE = {Task.TREND: 50, Task.QUALITY: 16, Task.SCRIPT: 1}
"""Items a worker answers in one model call: big enough to amortize the call, small enough
that a lost worker costs little to redo (a script is one long generation)."""

STALE_AFTER_SECONDS = 10.0
"""A worker silent this long is gone: its claimed chunks are queued again."""


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
                        "body": body.model_dump_json(by_alias=True),
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
