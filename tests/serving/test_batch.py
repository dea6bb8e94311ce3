"""Batch jobs: the store's bookkeeping (each result once, dead letters, statuses, dead workers'
chunks), priorities in the queue, and real `contentml batch worker` processes answering jobs on
the embedded SQLite queue and on Redis + PostgreSQL. A worker killed in the middle of a job is in
tests/e2e/test_e2e.py, where a trend champion makes chunks take real time."""

from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
import re
import threading
import time
from collections.abc import Iterator

import pydantic
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from huey.consumer import Worker

from contentml.errors import UserError
from contentml.settings import Settings
from serving.backend.batch import queue as batch_queue
from serving.backend.batch.models import BatchRequest, JobStatus, Priority, parse_items
from serving.backend.batch.queue import BatchQueue
from serving.backend.batch.routes import batch_router
from serving.backend.batch.schema import ChunkState
from serving.backend.batch.store import STALE_AFTER_SECONDS, JobStore
from serving.backend.tasks import Task, TrendBody
from tests.conftest import make_settings, requires_postgres, requires_redis
from tests.helpers.batch import trend_items, worker
from tests.helpers.registry import cli

REDIS_QUEUE = "redis://127.0.0.1:6379/7"
"""A Redis database of its own: the tests flush it."""


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    store = JobStore(settings.backend_store)
    yield store
    store.close()


def create(store: JobStore, task: Task, raw: list[dict], priority=Priority.BULK) -> str:
    job_id, _ = store.create(task, parse_items(task, raw), priority, "channel-a")
    return job_id


# --- submissions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "problem"),
    [
        ([{"history": [1.0] * 48}], "items[0].id"),
        ([*trend_items(1), *trend_items(1)], "repeated"),
        ([{"id": "a", "history": [1.0] * 3}], "items[0] (id 'a'): history"),
        ([{"id": "a", "history": [1.0] * 48, "colour": "red"}], "colour"),
        (["not an object"], "items[0] must be an object"),
    ],
)
def test_a_bad_item_is_refused_by_index_and_id(items, problem):
    with pytest.raises(UserError, match=re.escape(problem)):
        parse_items(Task.TREND, items)


@pytest.mark.parametrize("value", [" ", "\n", "a\x00b", "a\u202eb"])
def test_a_blank_or_unprintable_id_is_refused_before_anything_is_queued(value):
    """The cost ledger would refuse it after each script was generated: the chunk would be
    paid for and regenerated four times, then dead-lettered."""
    item = {"id": "s1", "topic": "tomatoes", "persona": "a gardener", "video_id": value}
    with pytest.raises(UserError, match=r"items\[0\] \(id 's1'\): video_id: Value error"):
        parse_items(Task.SCRIPT, [item])
    with pytest.raises(pydantic.ValidationError, match="channel"):
        BatchRequest(items=[item], channel=value)


def test_a_submitted_job_is_queued_in_chunks(settings: Settings):
    queue = BatchQueue(settings)
    accepted = queue.submit(Task.TREND, BatchRequest(items=trend_items(120)))
    assert accepted.status is JobStatus.QUEUED and accepted.total == 120
    assert queue.huey.pending_count() == 3  # chunks of 50
    report = queue.store.report(accepted.job_id)
    assert (report.status, report.succeeded, report.failed) == (JobStatus.QUEUED, 0, 0)
    queue.close()


def test_urgent_jobs_are_dequeued_before_bulk_ones(settings: Settings):
    queue = BatchQueue(settings)
    bulk = queue.submit(Task.TREND, BatchRequest(items=trend_items(100)))
    urgent = queue.submit(Task.TREND, BatchRequest(items=trend_items(1), priority=Priority.URGENT))
    first = queue.huey.dequeue()
    assert first.args[0] == urgent.job_id
    assert queue.huey.dequeue().args[0] == bulk.job_id
    queue.close()


def test_a_caller_over_its_share_of_queued_items_gets_429_and_nothing_stored(
    settings: Settings, monkeypatch
):
    monkeypatch.setattr(batch_queue, "MAX_OPEN_ITEMS_PER_CHANNEL", 150)
    queue = BatchQueue(settings)
    app = FastAPI()
    app.include_router(batch_router(queue))
    with TestClient(app) as client:
        first = client.post("/batch/trend", json={"items": trend_items(120), "channel": "ch-a"})
        assert first.status_code == 202
        over = client.post("/batch/trend", json={"items": trend_items(31), "channel": "ch-a"})
        assert over.status_code == 429 and over.headers["Retry-After"] == "60"
        assert "'ch-a' has 120 batch items waiting" in over.json()["detail"]
        # Other callers have their own share; a job's done chunks free its caller's.
        other = client.post("/batch/trend", json={"items": trend_items(120), "channel": "ch-b"})
        assert other.status_code == 202
        job = first.json()["job_id"]
        queue.store.set_chunk(job, 0, ChunkState.DONE)
        assert queue.store.open_items("ch-a") == 70
        again = client.post("/batch/trend", json={"items": trend_items(31), "channel": "ch-a"})
        assert again.status_code == 202
        listing = client.get("/batch/jobs", params={"channel": "ch-a"}).json()
    assert [j["job_id"] for j in listing] == [again.json()["job_id"], job]
    assert queue.huey.pending_count() == 3 + 3 + 1  # the refused job queued nothing
    queue.close()


# --- the store's bookkeeping ---------------------------------------------------------------


def test_each_result_is_written_once(store: JobStore):
    job = create(store, Task.TREND, trend_items(3))
    store.save_results(job, [("item-0", {"n": 1}), ("item-1", {"n": 1})])
    store.save_results(job, [("item-0", {"n": 2})])  # a chunk answered twice
    assert [(r.id, r.result) for r in store.results(job)] == [
        ("item-0", {"n": 1}),
        ("item-1", {"n": 1}),
    ]
    assert store.report(job).status is JobStatus.RUNNING


def test_an_item_is_in_the_results_or_the_dead_letters_never_both(store: JobStore):
    job = create(store, Task.TREND, trend_items(2))
    store.save_results(job, [("item-0", {"n": 1})])
    store.dead_letter(job, [("item-0", "late failure"), ("item-1", "model down")])
    assert [d.id for d in store.dead_letters(job)] == ["item-1"]
    store.save_results(job, [("item-1", {"n": 1})])  # answered after a retry
    assert store.dead_letters(job) == []
    report = store.report(job)
    assert (report.status, report.succeeded, report.failed) == (JobStatus.DONE, 2, 0)


def test_a_job_whose_items_all_fail_ends_failed_with_the_reasons(store: JobStore):
    job = create(store, Task.TREND, trend_items(2))
    store.dead_letter(job, [("item-0", "model down"), ("item-1", "model down")])
    report = store.report(job)
    assert (report.status, report.failed, report.errors) == (JobStatus.FAILED, 2, ["model down"])


def test_a_claim_takes_only_unanswered_items_and_counts_attempts(store: JobStore):
    job = create(store, Task.TREND, trend_items(3))
    store.save_results(job, [("item-1", {"n": 1})])
    claim = store.claim(job, 0, "worker-a")
    assert [item_id for item_id, _ in claim.items] == ["item-0", "item-2"]
    assert isinstance(claim.items[0][1], TrendBody) and claim.attempts == 1
    store.set_chunk(job, 0, ChunkState.DONE)
    assert store.claim(job, 0, "worker-b") is None


def test_a_silent_workers_chunk_is_taken_over_once(store: JobStore):
    job = create(store, Task.TREND, trend_items(1))
    store.heartbeat("worker-a")
    store.claim(job, 0, "worker-a")
    assert store.abandoned(STALE_AFTER_SECONDS) == []
    assert store.abandoned(stale_after=-1) == [(job, 0, "worker-a", 1)]  # its beat is "old"
    assert store.take_over(job, 0, "worker-a")
    assert not store.take_over(job, 0, "worker-a")  # a second reaper finds nothing to take


def test_dead_letters_are_released_and_their_chunks_reopened(store: JobStore):
    job = create(store, Task.TREND, trend_items(60))
    failed = {"item-3", "item-55"}
    store.save_results(job, [(f"item-{i}", {}) for i in range(60) if f"item-{i}" not in failed])
    store.dead_letter(job, [("item-3", "x"), ("item-55", "y")])
    store.set_chunk(job, 0, ChunkState.DONE)
    store.set_chunk(job, 1, ChunkState.DONE)
    count, reopened = store.release_dead_letters(job, ["item-55"])
    assert count == 1 and [(r.job_id, r.chunk) for r in reopened] == [(job, 1)]
    assert [d.id for d in store.dead_letters()] == ["item-3"]
    assert [item_id for item_id, _ in store.claim(job, 1, "w").items] == ["item-55"]


def test_an_unknown_job_is_an_error_naming_it(store: JobStore):
    with pytest.raises(UserError, match="no batch job 'nope'"):
        store.report("nope")


# --- the queue's messages -------------------------------------------------------------------


class Planted:
    """What someone with write access to the queue could put there: unpickled, it makes a
    folder (any code could run in its place)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_queue_messages_are_json_and_survive_the_round_trip(settings: Settings):
    queue = BatchQueue(settings)
    task = queue.run_chunk.s("job-1", 3, priority=10)
    task.eta = datetime.datetime(2026, 11, 27, 12, 30, 15, 123456)  # as a retry sets it
    task.expires = datetime.timedelta(minutes=5)
    data = queue.huey.serialize_task(task)
    assert json.loads(data)["__huey_message__"]["args"] == ["job-1", 3]
    again = queue.huey.deserialize_task(data)
    assert (again.id, list(again.args), again.priority) == (task.id, ["job-1", 3], 10)
    assert (again.eta, again.expires) == (task.eta, task.expires)
    assert again.retries == 3 and again.retry_backoff == 2
    queue.close()


def test_a_pickled_message_on_the_queue_is_refused_not_unpickled(settings, tmp_path, caplog):
    marker = tmp_path / "ran"
    queue = BatchQueue(settings)
    queue.huey.storage.enqueue(pickle.dumps(Planted(str(marker))), 0)
    consumer = Worker(queue.huey, threading.Event(), 0.01, 0.01, 1.0)
    with caplog.at_level(logging.ERROR, logger="huey"):
        consumer.loop()
    assert "Error reading from queue" in caplog.text
    assert not marker.exists() and len(queue.huey) == 0
    queue.close()


# --- real workers --------------------------------------------------------------------------


def wait_until_finished(store: JobStore, job_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        report = store.report(job_id)
        if report.status in (JobStatus.DONE, JobStatus.FAILED):
            return report
        assert time.monotonic() < deadline, f"job not finished in {timeout} s: {report}"
        time.sleep(0.5)


def run_jobs(settings: Settings) -> None:
    """A trend job answered in full (no champion here: seasonal-naive fallbacks) and a quality
    job that fails (no quality model) after its retries, into the dead letters."""
    queue = BatchQueue(settings)
    trend = queue.submit(Task.TREND, BatchRequest(items=trend_items(120), channel="cooking"))
    quality = queue.submit(Task.QUALITY, BatchRequest(items=[{"id": "q1", "text": "hello"}]))
    with worker(settings):
        report = wait_until_finished(queue.store, trend.job_id)
        assert (report.status, report.succeeded, report.failed) == (JobStatus.DONE, 120, 0)
        answers = queue.store.results(trend.job_id)
        assert [a.id for a in answers] == [f"item-{i}" for i in range(120)]
        assert answers[0].result["fallback"] and len(answers[0].result["forecast"]) == 24
        failed = wait_until_finished(queue.store, quality.job_id, timeout=60)
    assert failed.status is JobStatus.FAILED and "quality model is not ready" in failed.errors[0]
    letters = queue.store.dead_letters(quality.job_id)
    assert [(d.job_id, d.id) for d in letters] == [(quality.job_id, "q1")]
    queue.close()


@pytest.mark.slow
def test_a_worker_answers_jobs_on_the_embedded_queue(settings: Settings):
    run_jobs(settings)


@requires_redis
@requires_postgres
@pytest.mark.slow
def test_a_worker_answers_jobs_on_redis_and_postgresql(tmp_path, postgres_url: str):
    redis.Redis.from_url(REDIS_QUEUE).flushdb()
    settings = make_settings(
        tmp_path / "state", CONTENTML_BATCH_QUEUE=REDIS_QUEUE, CONTENTML_BACKEND_STORE=postgres_url
    )
    run_jobs(settings)


@pytest.mark.slow
def test_the_cli_submits_follows_and_retries_dead_letters(tmp_path):
    from tests.conftest import run_cli

    home = tmp_path / "state"
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"items": [{"id": "q1", "text": "hello"}]}))
    submitted = run_cli(home, "batch", "submit", "quality", str(job_file), "--channel", "c")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    status = json.loads(run_cli(home, "batch", "status", job_id).stdout)
    assert (status["status"], status["total"]) == ("queued", 1)
    assert json.loads(run_cli(home, "batch", "results", job_id).stdout) == []
    store = JobStore(make_settings(home).backend_store)
    store.dead_letter(job_id, [("q1", "model down")])
    listed = json.loads(run_cli(home, "batch", "dlq", "list", "--json").stdout)
    assert listed == [{"job_id": job_id, "id": "q1", "error": "model down"}]
    retried = run_cli(home, "batch", "dlq", "retry", "--job", job_id)
    assert json.loads(retried.stdout) == {"requeued": 1}
    assert store.dead_letters() == []
    store.close()


@pytest.mark.parametrize(
    "argv",
    [
        ("batch", "submit", "weather", "job.json"),
        ("batch", "submit", "trend", "missing.json"),
        ("batch", "status", "no-such-job"),
        ("batch", "dlq", "retry", "--id", "x"),
        ("costs", "--since", "yesterday"),
    ],
)
def test_bad_batch_arguments_exit_2_with_a_message(tmp_path, argv, monkeypatch, capsys):
    status, _, err = cli(make_settings(tmp_path / "state"), monkeypatch, capsys, *argv)
    assert status == 2 and "contentml: error:" in err
