"""The cost ledger: what every script call and batch job cost, per channel and per day, and the
roadmap's early warning (cost per video above $1.00 for 10 videos in a row). Any process (the
API, each batch worker) records into one database (`Settings.backend_store`: SQLite locally,
PostgreSQL in the cluster), so `contentml costs` and the alert see all of them.

- **Entries.** One row per charge (`cost_entries`), with its UTC day stored beside the time, so
  the per-day summary is a plain GROUP BY on both databases.
- **Videos.** Entries with a `video_id` are summed per video. A `script` call without one is a
  video of its own (one script = one video), keyed `script-call:<entry id>`; batch entries
  without a video id belong to no video. The per-video totals (`cost_videos`) are updated in the
  same transaction as the entry (an upsert, atomic on both databases), so the streak reads a
  few indexed rows however long the ledger is.
- **Alert.** `CostCollector` exposes the streak and the latest video's cost on `/metrics`, read
  at scrape time; the `ContentmlCostPerVideoOverBudget` rule (manifests/monitoring) fires on
  it. `record` also logs a warning once each time the streak reaches its length.
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Annotated

import pydantic
import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from contentml import events
from contentml.db import UPSERT, open_database, upsert
from contentml.errors import UserError
from contentml.settings import Settings

logger = logging.getLogger(__name__)

UNASSIGNED = "unassigned"
SCRIPT = "script"
SCRIPT_CALL_KEY = "script-call:"
MAX_NAME = 200
STREAK_METRIC = "contentml_cost_over_budget_streak"
PER_VIDEO_METRIC = "contentml_cost_per_video_usd"
COST_METRICS = (STREAK_METRIC, PER_VIDEO_METRIC)

metadata = sa.MetaData()

entries = sa.Table(
    "cost_entries",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("day", sa.Date, nullable=False),  # UTC day of `at`
    sa.Column("channel", sa.String(MAX_NAME), nullable=False),
    sa.Column("kind", sa.String(MAX_NAME), nullable=False),
    sa.Column("usd", sa.Float, nullable=False),
    sa.Column("compute_seconds", sa.Float, nullable=False),
    sa.Column("provider", sa.String(MAX_NAME)),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("video_id", sa.String(MAX_NAME)),
    sa.Column("job_id", sa.String(MAX_NAME)),
    sa.Index("cost_entries_day_channel", "day", "channel"),
)

videos = sa.Table(
    "cost_videos",
    metadata,
    sa.Column("video_key", sa.String(MAX_NAME + len(SCRIPT_CALL_KEY)), primary_key=True),
    sa.Column("channel", sa.String(MAX_NAME), nullable=False),  # of the video's first entry
    sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("first_entry", sa.BigInteger, nullable=False),  # breaks ties of first_at
    sa.Column("usd", sa.Float, nullable=False),
    sa.Index("cost_videos_order", "first_at", "first_entry"),
)

# An upsert that adds to the video's total: the same statement on both databases.


def name_problem(value: object) -> str | None:
    """What keeps `value` from being stored as a name an entry is booked under (a channel, a
    video, a kind, ...), or None: text, not blank, at most `MAX_NAME` characters, every one
    printable (a control character would forge lines in logs and reports)."""
    if not isinstance(value, str) or not value.strip():
        return f"must be non-empty text of at most {MAX_NAME} characters, not {value!r:.80}"
    if len(value) > MAX_NAME:
        return f"must be at most {MAX_NAME} characters, not {len(value)}"
    if not value.isprintable():
        return f"must hold no control or other unprintable characters, not {value!r:.80}"
    return None


def _booked_name(value: str) -> str:
    value = value.strip()
    if (problem := name_problem(value)) is not None:
        raise ValueError(problem)
    return value


BookedName = Annotated[str, pydantic.AfterValidator(_booked_name)]
"""A channel or video id in a request body, stripped and checked as `CostLedger.record` will
check it: a body the ledger would refuse is refused (422 naming the field) before the script
it pays for is generated, not after."""


@dataclass(frozen=True)
class CostEntry:
    """One charge, as a caller reports it to `CostLedger.record`."""

    channel: str
    """The channel the work was for; `unassigned` when the caller gave none."""
    kind: str
    """What was paid for: `script` (a /generate/script call), `batch:trend`, `batch:quality`,
    `batch:script`."""
    usd: float
    """Total cost of this entry: tokens x price + compute."""
    compute_seconds: float = 0.0
    """Seconds of compute charged (see `compute_cost`)."""
    provider: str | None = None
    """The script provider that answered (e.g. `openai`, `contentml`)."""
    prompt_tokens: int = 0
    """Tokens sent to the provider."""
    completion_tokens: int = 0
    """Tokens the provider generated."""
    video_id: str | None = None
    """The video this cost belongs to, when known."""
    job_id: str | None = None
    """The batch job it came from, when it came from one."""

    def check(self) -> None:
        """Raise `UserError` naming the first field that cannot be stored."""
        for name in ("channel", "kind", "provider", "video_id", "job_id"):
            value = getattr(self, name)
            if value is None and name not in ("channel", "kind"):
                continue
            if (problem := name_problem(value)) is not None:
                raise UserError(f"{name} {problem}")
        for name in ("usd", "compute_seconds", "prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            types = int if name.endswith("tokens") else int | float
            if isinstance(value, bool) or not isinstance(value, types) or not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, not {value!r}")
            if value < 0:
                raise UserError(f"{name} must not be negative, not {value!r}")


def compute_cost(seconds: float, usd_per_hour: float) -> float:
    """The price of `seconds` of compute at `usd_per_hour`."""
    return seconds * usd_per_hour / 3600.0


class CostLedger:
    """Cost entries and per-video totals in the database at `url`; a video costing more than
    `video_budget_usd` is over budget, and `streak_length` such videos in a row fire the alert."""

    def __init__(self, url: str, *, video_budget_usd: float = 1.0, streak_length: int = 10):
        # Only the cost_ tables: serving/backend/batch/ keeps its own in the same database.
        self.engine = open_database(url, metadata)
        if self.engine.dialect.name not in UPSERT:
            raise UserError(
                f"the cost ledger needs SQLite or PostgreSQL, not {self.engine.dialect.name}"
            )
        self.video_budget_usd = video_budget_usd
        self.streak_length = streak_length
        self._lock = threading.Lock()
        # A streak already firing when this process starts was logged when it began.
        self._firing = self.over_budget_streak() >= streak_length

    @classmethod
    def from_settings(cls, settings: Settings) -> CostLedger:
        return cls(settings.backend_store)

    def close(self) -> None:
        self.engine.dispose()

    def record(self, entry: CostEntry, at: datetime.datetime | None = None) -> None:
        """Store one entry (at `at`, timezone-aware, now by default) and add it to its video's
        total; nothing is stored when the entry is refused."""
        entry.check()
        if at is None:
            at = datetime.datetime.now(datetime.UTC)
        elif at.tzinfo is None:
            raise UserError(f"at must be timezone-aware, not {at!r}")
        at = at.astimezone(datetime.UTC)  # SQLite keeps no offset: store UTC everywhere
        row = {f.name: getattr(entry, f.name) for f in fields(entry)}
        with self.engine.begin() as connection:
            (entry_id,) = connection.execute(
                entries.insert().values(**row, at=at, day=at.date())
            ).inserted_primary_key
            key = entry.video_id or (
                f"{SCRIPT_CALL_KEY}{entry_id}" if entry.kind == SCRIPT else None
            )
            if key is not None:
                insert = upsert(self.engine, videos).values(
                    video_key=key, channel=entry.channel, first_at=at, first_entry=entry_id,
                    usd=entry.usd,
                )  # fmt: skip
                connection.execute(
                    insert.on_conflict_do_update(
                        index_elements=[videos.c.video_key],
                        set_={"usd": videos.c.usd + insert.excluded.usd},
                    )
                )
        if key is not None:
            self._warn_on_crossing()

    def _warn_on_crossing(self) -> None:
        streak = self.over_budget_streak()
        firing = streak >= self.streak_length
        with self._lock:  # server threads record concurrently: log each crossing once
            crossed, self._firing = firing and not self._firing, firing
        if crossed:
            logger.warning(
                "cost per video above $%.2f for %d videos in a row (the alert's limit is %d)",
                self.video_budget_usd, streak, self.streak_length,
            )  # fmt: skip
            warning = {
                "streak": streak,
                "budget_usd": self.video_budget_usd,
                "streak_length": self.streak_length,
            }
            events.publish(events.EventKind.WARNING_COST, warning)

    def summary(
        self,
        *,
        channel: str | None = None,
        since: datetime.date | None = None,
        until: datetime.date | None = None,
    ) -> list[dict]:
        """One row per UTC day and channel (days `since` to `until`, both included), ordered
        by day then channel. `calls` counts entries, `jobs` distinct batch jobs, `videos`
        distinct videos with a cost that day; `usd_per_video` is all of the day's cost over
        its videos (None without videos)."""
        script_calls = sa.case(
            (sa.and_(entries.c.video_id.is_(None), entries.c.kind == SCRIPT), 1), else_=0
        )
        query = (
            sa.select(
                entries.c.day,
                entries.c.channel,
                sa.func.sum(entries.c.usd).label("usd"),
                sa.func.count().label("calls"),
                sa.func.count(sa.distinct(entries.c.job_id)).label("jobs"),
                (sa.func.count(sa.distinct(entries.c.video_id)) + sa.func.sum(script_calls)).label(
                    "videos"
                ),
                sa.func.sum(entries.c.prompt_tokens).label("prompt_tokens"),
                sa.func.sum(entries.c.completion_tokens).label("completion_tokens"),
                sa.func.sum(entries.c.compute_seconds).label("compute_seconds"),
            )
            .group_by(entries.c.day, entries.c.channel)
            .order_by(entries.c.day, entries.c.channel)
        )
        if channel is not None:
            query = query.where(entries.c.channel == channel)
        if since is not None:
            query = query.where(entries.c.day >= since)
        if until is not None:
            query = query.where(entries.c.day <= until)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        # PostgreSQL sums integers as NUMERIC: make every number a plain int or float.
        return [
            {
                "day": row.day.isoformat(),
                "channel": row.channel,
                "usd": float(row.usd),
                "calls": int(row.calls),
                "jobs": int(row.jobs),
                "videos": int(row.videos),
                "prompt_tokens": int(row.prompt_tokens),
                "completion_tokens": int(row.completion_tokens),
                "compute_seconds": float(row.compute_seconds),
                "usd_per_video": float(row.usd) / int(row.videos) if row.videos else None,
            }
            for row in rows
        ]

    def video_costs(self, last: int = 10) -> list[dict]:
        """The latest `last` videos by their first cost, newest last, each with all its cost."""
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise UserError(f"last must be a number of videos (0 or more), not {last!r}")
        query = (
            sa.select(videos.c.video_key, videos.c.channel, videos.c.usd)
            .order_by(videos.c.first_at.desc(), videos.c.first_entry.desc())
            .limit(last)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [{"video_id": r.video_key, "channel": r.channel, "usd": r.usd} for r in rows[::-1]]

    def over_budget_streak(self) -> int:
        """How many of the latest videos in a row each cost more than the budget: those after
        the latest video within budget."""
        cheap = (
            sa.select(videos.c.first_at, videos.c.first_entry)
            .where(videos.c.usd <= self.video_budget_usd)
            .order_by(videos.c.first_at.desc(), videos.c.first_entry.desc())
            .limit(1)
        )
        with self.engine.connect() as connection:
            last_cheap = connection.execute(cheap).one_or_none()
            query = sa.select(sa.func.count()).select_from(videos)
            if last_cheap is not None:
                query = query.where(
                    sa.tuple_(videos.c.first_at, videos.c.first_entry) > tuple(last_cheap)
                )
            return int(connection.execute(query).scalar_one())

    def alert(self) -> dict:
        """The early warning's state, as `contentml costs` shows it."""
        streak = self.over_budget_streak()
        return {
            "firing": streak >= self.streak_length,
            "streak": streak,
            "budget_usd": self.video_budget_usd,
            "streak_length": self.streak_length,
        }


class CostCollector:
    """`/metrics` gauges read from the ledger at each scrape, so every process's records count:
    the over-budget streak and the latest video's cost (absent before the first video)."""

    def __init__(self, ledger: CostLedger):
        self.ledger = ledger

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registration asks for the names only: no database read.
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                STREAK_METRIC, "Latest videos in a row that cost more than the budget"
            ),
            GaugeMetricFamily(PER_VIDEO_METRIC, "Cost of the latest video, all its entries summed"),
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            streak = self.ledger.over_budget_streak()
            latest = self.ledger.video_costs(1)
        except sa.exc.SQLAlchemyError as e:  # a scrape must not fail for the ledger
            logger.error("cost metrics: reading the ledger failed: %s", e, exc_info=e)
            return
        streak_family, per_video_family = self._families()
        streak_family.add_metric([], streak)
        yield streak_family
        if latest:
            per_video_family.add_metric([], latest[-1]["usd"])
        yield per_video_family


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, CostCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register_cost_metrics(
    ledger: CostLedger, registry: CollectorRegistry = REGISTRY
) -> CostCollector:
    """Expose the ledger's gauges in `registry`, once: a second call (another server in the
    same process) points the registered collector at its ledger instead."""
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = CostCollector(ledger)
            registry.register(collector)
        collector.ledger = ledger
        return collector
