"""Concurrent alias changes and registrations from several processes. On SQLite and PostgreSQL
the per-model lock must leave one exact, chained record per change and the alias where the newest
record says; a tracking server (no lock) must still record every change and end where the newest
record says. Registrations of one model at once must number their versions 1..N, each reported
to the process that made it, none failed."""

from __future__ import annotations

import contextlib
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pytest

from contentml import registry
from contentml.registry import Alias
from tests.conftest import make_settings, requires_postgres
from tests.helpers.registry import Constant, children, register_versions, shared_backend

WORKERS = 8
NAME = "raced"
# Each process holds up to four PostgreSQL connections while it registers (MLflow's tracking and
# registry stores pool their own); 32 of them beside the other test worker ran the server out of
# its 100 (CI, "too many clients"). A dozen at one barrier race just as hard.
REGISTRATIONS = 12
REGISTERED = "registered-at-once"


def promote_at_once(settings, version: str, start: multiprocessing.Barrier) -> None:
    """One worker process: connect, wait for all the others, promote."""
    client = registry.connect(settings)
    start.wait()
    registry.promote(client, NAME, version, reason=f"worker for v{version}")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on SQLite: what the registry looks like through HTTP only."""
    home = tmp_path_factory.mktemp("tracking-server")
    # Imported here: `entrypoints.demo` imports the training pipelines, seconds that every
    # worker process importing this module would pay.
    from entrypoints.demo import free_port

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
    locked = request.param != "http"
    if request.param == "sqlite":
        return make_settings(tmp_path / "state"), locked
    server = {"postgres": "postgres_url", "http": "tracking_server"}[request.param]
    return shared_backend(request, tmp_path, request.getfixturevalue(server)), locked


def test_concurrent_promotions_are_all_recorded_in_order(backend):
    settings, locked = backend
    versions = register_versions(settings, NAME, WORKERS)
    # Each worker starts like a separate `contentml promote`, no state shared (`children`).
    context = children(__name__)
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


def register_at_once(settings, model_uri: str, start, versions) -> None:
    """One worker process: connect, wait for all the others, register the same logged model
    (as `log_model(registered_model_name=...)` does) and report the version it got."""
    registry.connect(settings)
    start.wait()
    versions.put(mlflow.register_model(model_uri, REGISTERED).version)


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=requires_postgres)])
def test_parallel_registrations_number_versions_without_gaps(database, tmp_path, request):
    if database == "sqlite":
        settings = make_settings(tmp_path / "state")
    else:
        settings = shared_backend(request, tmp_path, request.getfixturevalue("postgres_url"))
    client = registry.connect(settings)
    with mlflow.start_run(experiment_id=registry.experiment_id(client, settings)):
        logged = mlflow.pyfunc.log_model(
            name="model", python_model=Constant(), pip_requirements=["mlflow"]
        )
    processes = children(__name__)
    start, versions = processes.Barrier(REGISTRATIONS), processes.Queue()
    workers = [
        processes.Process(
            target=register_at_once, args=(settings, logged.model_uri, start, versions)
        )
        for _ in range(REGISTRATIONS)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0] * REGISTRATIONS  # none failed
    expected = list(range(1, REGISTRATIONS + 1))
    # Each process was told a version of its own, and those are all the versions: no gaps.
    assert sorted(int(versions.get(timeout=10)) for _ in workers) == expected
    stored = client.search_model_versions(f"name = '{REGISTERED}'")
    assert sorted(int(v.version) for v in stored) == expected
    assert {v.status for v in stored} == {"READY"}
