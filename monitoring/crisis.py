"""CrisisManager's state: which channels are quarantined (no new uploads), kept in the platform's
shared SQL store (`Settings.backend_store`: SQLite locally, PostgreSQL in the cluster), so every
replica of the model server, and a restarted one, gives the same answer. The content pipeline
asks before each upload; people quarantine and release through the model server's
`/v1/channels` routes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa

from contentml.db import open_database, upsert
from contentml.names import MAX_CHANNEL_ID_LENGTH

MAX_REASON = 1_000

metadata = sa.MetaData()

quarantine = sa.Table(
    "crisis_quarantine",
    metadata,
    sa.Column("channel_id", sa.String(MAX_CHANNEL_ID_LENGTH), primary_key=True),
    sa.Column("reason", sa.String(MAX_REASON), nullable=False),
    sa.Column("since", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class Quarantine:
    channel_id: str
    reason: str
    since: float
    """Unix time it began."""


class QuarantineStore:
    """Quarantined channels in one table of the database at `url`; safe to share between
    request threads, processes and replicas."""

    def __init__(self, url: str):
        self.engine = open_database(url, metadata)

    def close(self) -> None:
        self.engine.dispose()

    def quarantine(self, channel_id: str, reason: str) -> Quarantine:
        """Stop uploads for a channel; quarantining it again keeps the first start and reason."""
        row = {"channel_id": channel_id, "reason": reason, "since": time.time()}
        with self.engine.begin() as connection:
            connection.execute(upsert(self.engine, quarantine).on_conflict_do_nothing(), row)
        return self.get(channel_id)

    def release(self, channel_id: str) -> bool:
        """Allow uploads again; False when the channel was not quarantined."""
        with self.engine.begin() as connection:
            deleted = connection.execute(
                quarantine.delete().where(quarantine.c.channel_id == channel_id)
            )
        return deleted.rowcount > 0

    def get(self, channel_id: str) -> Quarantine | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(quarantine).where(quarantine.c.channel_id == channel_id)
            ).one_or_none()
        return Quarantine(*row) if row else None

    def all(self) -> list[Quarantine]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(quarantine).order_by(quarantine.c.since))
            return [Quarantine(*row) for row in rows]
