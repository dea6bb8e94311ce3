"""The platform's small SQL stores (the RevenueOptimizer's rewards, batch jobs, costs) share one
way to open a database: SQLite locally, PostgreSQL in the cluster, from one URL setting."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa


def _sqlite_pragmas(connection, _record) -> None:
    # Several processes (server, workers) share the file: wait for a writer instead of failing.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def open_database(url: str, metadata: sa.MetaData) -> sa.Engine:
    """An engine on `url` with `metadata`'s tables created (those missing)."""
    if url.startswith("postgresql://"):  # psycopg 3, not SQLAlchemy's default psycopg2
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = sa.create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        if engine.url.database not in (None, "", ":memory:"):
            # SQLite creates the database file, not its folder.
            Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    metadata.create_all(engine)
    return engine
