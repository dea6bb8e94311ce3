"""Concurrent alias changes from several processes. On SQLite and PostgreSQL the per-model lock
must leave one exact, chained record per change and the alias where the newest record says; a
tracking server (no lock) must still record every change and end where the newest record says."""

from __future__ import annotations

import contextlib
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contentml import registry
from contentml.demo import free_port
from contentml.registry import Alias
from tests.conftest import make_settings, requires_postgres
from tests.test_registry import register_versions

WORKERS = 8
NAME = "raced"


def promote_at_once(settings, version: str, start: multiprocessing.Barrier) -> None:
    """One worker process: connect, wait for all the others, promote."""
    client = registry.connect(settings)
    start.wait()
    registry.promote(client, NAME, version, reason=f"worker for v{version}")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on SQLite: what the registry looks like through HTTP only."""
    home = tmp_path_factory.mktemp("tracking-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [Path(sys.executable).with_name("mlflow"), "server", "--host", "127.0.0.1"]
        + ["--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}"]
        + ["--artifacts-destination", str(home / "artifacts")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server did not answer (exit status {process.returncode})")
        yield url
    finally:
        process.terminate()  # it stops its own workers
        process.wait(timeout=60)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=requires_postgres),
        pytest.param("http", marks=pytest.mark.slow),
    ]
)
def backend(request, tmp_path: Path):
    """Settings for one backend, and whether it holds a lock (so records chain exactly)."""
    overrides = {}
    if request.param == "postgres":
        overrides["MLFLOW_TRACKING_URI"] = request.getfixturevalue("postgres_url")
    if request.param == "http":
        overrides["MLFLOW_TRACKING_URI"] = request.getfixturevalue("tracking_server")
    return make_settings(tmp_path / "state", **overrides), request.param != "http"


def test_concurrent_promotions_are_all_recorded_in_order(backend):
    settings, locked = backend
    versions = register_versions(settings, NAME, WORKERS)
    # spawn: each worker starts like a separate `contentml promote`, no state shared by fork.
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(WORKERS)
    workers = [
        context.Process(target=promote_at_once, args=(settings, version, start))
        for version in versions
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0] * WORKERS

    client = registry.connect(settings)
    events = registry.history(client, NAME)
    assert registry.alias_version(client, NAME, Alias.CHAMPION) == events[-1].to_version
    if locked:
        assert sorted(e.to_version for e in events) == sorted(versions)
        # Each change saw the one before it: every record's `from` is the previous one's `to`.
        assert [e.from_version for e in events] == [None] + [e.to_version for e in events[:-1]]
    else:
        # Without a lock a change may redo itself (an extra record) and a `from` may be stale.
        assert {e.to_version for e in events} == set(versions)
