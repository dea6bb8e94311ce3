"""CrisisManager's state: which channels are quarantined (no new uploads), kept durably in a
SQLite file under the platform's home, so a restart or a second server process sees the same
answer. The content pipeline asks before each upload; people quarantine and release through
the model server's `/v1/channels` routes."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

_SELECT = "SELECT channel_id, reason, since FROM quarantine"


@dataclass(frozen=True)
class Quarantine:
    channel_id: str
    reason: str
    since: float
    """Unix time it began."""


class QuarantineStore:
    """Quarantined channels in one SQLite table; every call opens its own connection, so the
    store is safe to share between request threads and processes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS quarantine "
                "(channel_id TEXT PRIMARY KEY, reason TEXT NOT NULL, since REAL NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def quarantine(self, channel_id: str, reason: str) -> Quarantine:
        """Stop uploads for a channel; quarantining it again keeps the first start and reason."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR IGNORE INTO quarantine VALUES (?, ?, ?)",
                (channel_id, reason, time.time()),
            )
            row = db.execute(_SELECT + " WHERE channel_id = ?", (channel_id,)).fetchone()
        return Quarantine(*row)

    def release(self, channel_id: str) -> bool:
        """Allow uploads again; False when the channel was not quarantined."""
        with closing(self._connect()) as db, db:
            cursor = db.execute("DELETE FROM quarantine WHERE channel_id = ?", (channel_id,))
        return cursor.rowcount > 0

    def get(self, channel_id: str) -> Quarantine | None:
        with closing(self._connect()) as db:
            row = db.execute(_SELECT + " WHERE channel_id = ?", (channel_id,)).fetchone()
        return Quarantine(*row) if row else None

    def all(self) -> list[Quarantine]:
        with closing(self._connect()) as db:
            rows = db.execute(_SELECT + " ORDER BY since")
            return [Quarantine(*row) for row in rows.fetchall()]
