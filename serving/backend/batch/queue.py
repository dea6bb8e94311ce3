"""The batch queue: submitting jobs to huey, running their chunks in the workers (retries,
dead letters, cost booking) and reaping the chunks of dead workers and lost messages."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence

from huey import PriorityRedisHuey, SqliteHuey
from huey.api import Huey
from kserve.errors import InvalidInput

from contentml import events
from contentml.errors import UserError
from contentml.settings import Settings
from serving.backend.batch.models import (
    BatchRequest,
    JobAccepted,
    JobStatus,
    Priority,
    parse_items,
)
from serving.backend.batch.schema import ChunkState
from serving.backend.batch.serializer import JsonSerializer
from serving.backend.batch.store import STALE_AFTER_SECONDS, Claim, JobStore, Requeue
from serving.backend.costs import CostEntry, CostLedger, compute_cost
from serving.backend.tasks import UNASSIGNED_CHANNEL, Task, TaskAnswerer
from training.quality.review_store import Source

logger = logging.getLogger(__name__)

MAX_OPEN_ITEMS_PER_CHANNEL = 50_000
"""Items a channel (the caller a job is booked to; jobs without one share `unassigned`) may
have waiting or running at once: a submission beyond it gets 429, so that one caller cannot
fill the queue ahead of every other."""

FULL_RETRY_AFTER_SECONDS = 60
"""What a caller over its share is told to wait: chunks finish in seconds to minutes."""

RETRIES = 3
"""Retries of a failed chunk before its items are dead-lettered."""

RETRY_DELAY_SECONDS = 1.0
"""The first retry's delay; each next one waits twice as long."""

HEARTBEAT_SECONDS = 2.0
"""How often a worker says it is alive (and reaps the chunks of workers that are not)."""

LOST_MESSAGE_SECONDS = 60.0
"""A chunk queued this long but no longer in the queue nor claimed lost its message."""

HUEY_PRIORITY = {Priority.BULK: 0, Priority.URGENT: 10}
"""huey dequeues higher numbers first."""


class OverCapacity(UserError):
    """A submission that would take a caller over `MAX_OPEN_ITEMS_PER_CHANNEL`."""


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
        self.publish_progress(job_id)
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
        self.publish_progress(job_id)

    def publish_progress(self, job_id: str) -> None:
        """A `batch.progress` event with the job's counts now (none for a job deleted)."""
        try:
            report = self.store.report(job_id)
        except UserError:
            return
        progress = report.model_dump(
            mode="json", include={"job_id", "task", "status", "total", "succeeded", "failed"}
        )
        events.publish(events.EventKind.BATCH_PROGRESS, progress, channel=report.channel)

    def _answer(self, claim: Claim) -> None:
        if not claim.items:
            return
        bodies = [body for _, body in claim.items]
        try:
            answers = self.answerer.answer(claim.task, bodies, claim.channel, source=Source.BATCH)
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
                (answer,) = self.answerer.answer(
                    claim.task, [body], claim.channel, source=Source.BATCH
                )
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
