"""The small SQL stores' SQLite settings: WAL without a sync per commit, and what that keeps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from contentml.db import open_database

NORMAL = 1
"""`PRAGMA synchronous`'s answer for NORMAL."""

metadata = sa.MetaData()
rows = sa.Table("rows", metadata, sa.Column("id", sa.Integer, primary_key=True))

KILLED_WRITER = """
import os, signal, sys
import sqlalchemy as sa
from contentml.db import open_database
from tests.unit.test_db import metadata, rows
engine = open_database(sys.argv[1], metadata)
with engine.begin() as connection:
    connection.execute(rows.insert().values(id=7))
os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint
"""


def test_a_commit_survives_its_process_being_killed(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, url], check=False)
    assert killed.returncode == -9

    engine = open_database(url, metadata)
    with engine.connect() as connection:
        assert connection.execute(sa.select(rows.c.id)).scalars().all() == [7]
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == NORMAL
    engine.dispose()
