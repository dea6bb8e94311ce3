"""CrisisManager's state: which channels are quarantined (no new uploads), and each channel's
recent metrics that anomalies are scored against, kept in the platform's shared SQL store
(`Settings.backend_store`: SQLite locally, PostgreSQL in the cluster), so every replica of the
model server, and a restarted one, gives the same answer. The content pipeline asks before each
upload; people quarantine and release through the model server's `/v1/channels` routes."""

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


points = sa.Table(
    "crisis_metric_points",
    metadata,
    sa.Column("point_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("channel_id", sa.String(MAX_CHANNEL_ID_LENGTH), nullable=False),
    sa.Column("metric", sa.String(32), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Index("crisis_metric_points_series", "channel_id", "metric", "point_id"),
)
"""The last points of each channel's metrics (`monitoring.anomaly.CrisisMonitor`'s window)."""


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


class SqlMetricHistory:
    """`monitoring.anomaly.MetricHistory` in the database of `QuarantineStore`'s engine: the
    replicas score a channel's point against the same window, which a restart keeps."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def recent(self, channel_id: str, metric: str, count: int) -> list[float]:
        query = (
            sa.select(points.c.value)
            .where(points.c.channel_id == channel_id, points.c.metric == metric)
            .order_by(points.c.point_id.desc())
            .limit(count)
        )
        with self.engine.connect() as connection:
            return list(connection.scalars(query))[::-1]

    def append(self, channel_id: str, metric: str, value: float, keep: int) -> None:
        series = (points.c.channel_id == channel_id) & (points.c.metric == metric)
        newest = (
            sa.select(points.c.point_id)
            .where(series)
            .order_by(points.c.point_id.desc())
            .limit(keep)
        )
        with self.engine.begin() as connection:
            connection.execute(
                points.insert().values(channel_id=channel_id, metric=metric, value=value)
            )
            connection.execute(points.delete().where(series, points.c.point_id.not_in(newest)))
