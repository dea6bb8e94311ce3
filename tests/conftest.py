"""Shared fixtures: an isolated state folder per test, and the real PostgreSQL and Redis."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

# Three test workers share two cores, and each starts servers, pipelines and trainings of its
# own: one OpenMP thread per process, or the threads spin at barriers waiting for each other
# (a LoRA fixture took 75 s in the suite and 5 s alone; the suite 968 s, then 774 s). Set
# before torch or sklearn loads its OpenMP runtime, which reads it once; children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from contentml import events
from contentml.settings import Settings

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCHEMAS_DIR = DATA_DIR.parent / "schemas"
"""Custom-resource schemas (KServe, Kubeflow Trainer), read in place, never copied."""
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def reachable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


requires_postgres = pytest.mark.skipif(
    not reachable("127.0.0.1", 5432),
    reason="PostgreSQL is not running on 127.0.0.1:5432 (CI and developer machines have it)",
)
requires_redis = pytest.mark.skipif(
    not reachable("127.0.0.1", 6379),
    reason="Redis is not running on 127.0.0.1:6379 (CI and developer machines have it)",
)


def run_cli(home: Path, *argv: str) -> subprocess.CompletedProcess:
    """`contentml ARGV` in a child process with the embedded settings rooted in `home`."""
    env = {**os.environ, **make_settings(home).to_env()}
    return subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def wait_until(condition, seconds: float, what: str, every: float = 0.05) -> None:
    """Poll `condition` until it holds; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        time.sleep(every)


def make_settings(home: Path, **overrides: str) -> Settings:
    """Embedded settings rooted in `home`, with environment-style overrides. A new home's
    MLflow registry starts as a copy of an empty one (`empty_registry`)."""
    environ = {"CONTENTML_HOME": str(home), "CONTENTML_DATA_DIR": str(DATA_DIR), **overrides}
    settings = Settings.from_env(environ)
    registry_file = settings.home / "mlflow.db"
    if settings.mlflow_tracking_uri == f"sqlite:///{registry_file}" and not registry_file.exists():
        settings.home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(empty_registry(), registry_file)
    return settings


@functools.cache
def empty_registry() -> Path:
    """An embedded MLflow registry with its tables made and nothing in them, made once per test
    process: MLflow makes a new registry's tables by running its migrations, about a second of
    CPU in each of the suite's ~70 new homes. `tests/unit/test_registry.py` covers the first
    connection to a home without one."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="contentml-empty-registry-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # Quietly: MLflow logs its migrations to stderr, into the output of whichever test made
    # the process's first home (a test of a command's one-line error, say).
    migrations = logging.getLogger("mlflow.store.db.utils")
    level = migrations.level
    migrations.setLevel(logging.WARNING)
    try:
        # A client of its own: `registry.connect` would point this process's MLflow at it.
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    finally:
        migrations.setLevel(level)
    return folder / "mlflow.db"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a slow test first, each kept whole and in place otherwise: with `make
    test`'s xdist workers taking a module at a time, the long ones (pipelines, servers, the
    demo) start early and the quick ones fill in around them, instead of one long module
    running alone at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(autouse=True)
def restore_environment() -> Iterator[None]:
    """`mlflow.set_tracking_uri` (and kfp.local runs) write to os.environ; without this, one
    test's tracking URI would leak into the next test and its child processes."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True, scope="module")
def restore_module_environment() -> Iterator[None]:
    """The same for module-scoped fixtures (a model trained once per module), which run before
    the per-test snapshot and would otherwise leak into the modules after them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and OpenMP threads slow to a crawl when other
    jobs hold the two cores (boosting and torch spin while they wait for each other)."""
    with threadpool_limits(1):
        yield


@pytest.fixture(autouse=True)
def isolated_event_bus(tmp_path: Path) -> None:
    """Events a test's own process publishes (a promotion, a quarantine) go to a store of the
    test's, not to the checkout's `.contentml/`; the bus opens only if one is published."""
    events.configure(make_settings(tmp_path / "events"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "state")


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test module, dropped afterwards."""
    import sqlalchemy

    if not reachable("127.0.0.1", 5432):
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    name = f"contentml_test_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
