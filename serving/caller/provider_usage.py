"""What the script providers' keys did, in the shared SQL store (`Settings.backend_store`:
SQLite locally, PostgreSQL in the cluster), so every replica of the API and every batch worker
spreads its calls over the same counts and skips the same rate-limited keys:

- `provider_key_usage`: requests, prompt and completion tokens per provider, key index and UTC
  day (an upsert that adds, atomic on both databases): the daily quota counts these.
- `provider_key_limits`: until when a key that answered 429 is skipped (its `Retry-After`).
- `provider_events`: one row per answered call (its answer time and the quality score of the
  script), per 429 (`rate_limit`) and per failed provider attempt (`failure`), kept
  `RETENTION_SECONDS` for the last hour's counts, the medians and the quality share.
- `provider_warning_claims`: which early warning was already sent for which period (a day or
  an hour), so that one replica sends each once; kept `RETENTION_SECONDS`, past any period.
- `provider_notices`: the last capacity announced, so that one replica announces a change.
  Versions before `provider_warning_claims` kept the claims here too (value `sent`): opening
  the store moves them over (`_move_legacy_claims`), so they are pruned and not sent again.

Times are UNIX seconds (a float column: the same comparisons on both databases); a key is its
index in the provider's key list, never its text.
"""

from __future__ import annotations

import datetime
import statistics
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa

from contentml.db import open_database, upsert
from contentml.settings import Settings

WallClock = Callable[[], float]
"""UNIX seconds now (tests pass a fake one to cross a day or an hour)."""

RETENTION_SECONDS = 8 * 24 * 3600.0
"""Events and warning claims older than this are deleted: the learned normal answer time looks
back 7 days, and a claim's period (a day at most) is long over."""

PRUNE_EVERY_SECONDS = 3600.0
"""How often one process deletes expired events."""

MAX_NAME = 200

LEGACY_CLAIM_VALUE = "sent"
"""What a claim's row held in `provider_notices` (the capacity notice holds a number)."""

RATE_LIMIT, FAILURE, CALL = "rate_limit", "failure", "call"

metadata = sa.MetaData()

key_usage = sa.Table(
    "provider_key_usage",
    metadata,
    sa.Column("provider", sa.String(MAX_NAME), primary_key=True),
    sa.Column("key_index", sa.Integer, primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
)

key_limits = sa.Table(
    "provider_key_limits",
    metadata,
    sa.Column("provider", sa.String(MAX_NAME), primary_key=True),
    sa.Column("key_index", sa.Integer, primary_key=True),
    sa.Column("until", sa.Float, nullable=False),
)

events = sa.Table(
    "provider_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("provider", sa.String(MAX_NAME), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("key_index", sa.Integer),
    sa.Column("latency_s", sa.Float),  # calls: the provider's answer time
    sa.Column("quality_score", sa.Float),  # calls: the script's score, null when unscored
    sa.Index("provider_events_kind_at", "kind", "provider", "at"),
)

warning_claims = sa.Table(
    "provider_warning_claims",
    metadata,
    sa.Column("name", sa.String(2 * MAX_NAME), primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
)

notices = sa.Table(
    "provider_notices",
    metadata,
    sa.Column("name", sa.String(2 * MAX_NAME), primary_key=True),
    sa.Column("value", sa.String(MAX_NAME), nullable=False),
)


def utc_day(at: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).date()


class ProviderUsage:
    """The providers' usage in the database at `url` (see the module docstring)."""

    def __init__(self, url: str, *, now: WallClock = time.time) -> None:
        self.engine = open_database(url, metadata)
        self.now = now
        self._pruned_at = float("-inf")
        self._prune_lock = threading.Lock()
        self._move_legacy_claims()

    @classmethod
    def from_settings(cls, settings: Settings, *, now: WallClock = time.time) -> ProviderUsage:
        return cls(settings.backend_store, now=now)

    def close(self) -> None:
        self.engine.dispose()

    # --- writes ---------------------------------------------------------------------------

    def record_call(
        self,
        provider: str,
        key_index: int,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        latency_s: float,
        quality_score: float | None,
    ) -> None:
        """One answered request: it counts against the key's quota today, and its answer time
        and the script's score go to the medians and the quality share."""
        at = self.now()
        insert = upsert(self.engine, key_usage).values(
            provider=provider, key_index=key_index, day=utc_day(at), requests=1,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        )  # fmt: skip
        with self.engine.begin() as connection:
            connection.execute(
                insert.on_conflict_do_update(
                    index_elements=[key_usage.c.provider, key_usage.c.key_index, key_usage.c.day],
                    set_={
                        "requests": key_usage.c.requests + 1,
                        "prompt_tokens": key_usage.c.prompt_tokens + insert.excluded.prompt_tokens,
                        "completion_tokens": key_usage.c.completion_tokens
                        + insert.excluded.completion_tokens,
                    },
                )
            )
            connection.execute(
                events.insert().values(
                    provider=provider,
                    kind=CALL,
                    at=at,
                    key_index=key_index,
                    latency_s=latency_s,
                    quality_score=quality_score,
                )  # fmt: skip
            )
        self._prune(at)

    def record_rate_limit(self, provider: str, key_index: int, retry_after: float) -> None:
        """A key answered 429: it is skipped for `retry_after` seconds, on every replica."""
        at = self.now()
        insert = upsert(self.engine, key_limits).values(
            provider=provider, key_index=key_index, until=at + retry_after
        )
        with self.engine.begin() as connection:
            connection.execute(
                insert.on_conflict_do_update(
                    index_elements=[key_limits.c.provider, key_limits.c.key_index],
                    set_={"until": insert.excluded.until},
                )
            )
            connection.execute(
                events.insert().values(
                    provider=provider, kind=RATE_LIMIT, at=at, key_index=key_index
                )
            )

    def record_failure(self, provider: str) -> None:
        """An attempt of `provider` failed and the chain moved on (its error threshold counts
        these)."""
        with self.engine.begin() as connection:
            connection.execute(
                events.insert().values(provider=provider, kind=FAILURE, at=self.now())
            )

    def _move_legacy_claims(self) -> None:
        """Claims an older version kept in `provider_notices` become claims made now: kept
        `RETENTION_SECONDS` like new ones, and still not sent twice in their period. A no-op
        once moved; two replicas starting together move each row once (on conflict, nothing)."""
        legacy = notices.c.value == LEGACY_CLAIM_VALUE
        moved = sa.select(notices.c.name, sa.literal(self.now(), sa.Float)).where(legacy)
        with self.engine.begin() as connection:
            connection.execute(
                upsert(self.engine, warning_claims)
                .from_select(["name", "at"], moved)
                .on_conflict_do_nothing()
            )
            connection.execute(notices.delete().where(legacy))

    def _prune(self, at: float) -> None:
        with self._prune_lock:
            if at - self._pruned_at < PRUNE_EVERY_SECONDS:
                return
            self._pruned_at = at
        with self.engine.begin() as connection:
            connection.execute(events.delete().where(events.c.at < at - RETENTION_SECONDS))
            connection.execute(
                warning_claims.delete().where(warning_claims.c.at < at - RETENTION_SECONDS)
            )

    # --- reads ----------------------------------------------------------------------------

    def requests_today(self, provider: str) -> dict[int, int]:
        """Requests each key of `provider` sent today (UTC), by key index; absent: none."""
        query = sa.select(key_usage.c.key_index, key_usage.c.requests).where(
            key_usage.c.provider == provider, key_usage.c.day == utc_day(self.now())
        )
        with self.engine.connect() as connection:
            return {int(index): int(n) for index, n in connection.execute(query)}

    def limited_keys(self, provider: str) -> dict[int, float]:
        """Keys of `provider` still inside their `Retry-After`: index -> until (UNIX s)."""
        query = sa.select(key_limits.c.key_index, key_limits.c.until).where(
            key_limits.c.provider == provider, key_limits.c.until > self.now()
        )
        with self.engine.connect() as connection:
            return {int(index): float(until) for index, until in connection.execute(query)}

    def event_times(self, provider: str, kind: str, seconds: float) -> list[float]:
        """When `provider`'s events of `kind` happened in the last `seconds`, oldest first."""
        query = (
            sa.select(events.c.at)
            .where(
                events.c.provider == provider,
                events.c.kind == kind,
                events.c.at >= self.now() - seconds,
            )
            .order_by(events.c.at)
        )
        with self.engine.connect() as connection:
            return [float(at) for (at,) in connection.execute(query)]

    def median_latency(self, provider: str, since: float, until: float) -> tuple[float, int]:
        """The median answer time of `provider`'s calls after `since` seconds ago up to
        `until` seconds ago (nan without calls), and how many calls it is over."""
        now = self.now()
        query = sa.select(events.c.latency_s).where(
            events.c.provider == provider,
            events.c.kind == CALL,
            events.c.at > now - since,
            events.c.at <= now - until,
        )
        with self.engine.connect() as connection:
            latencies = [float(x) for (x,) in connection.execute(query)]
        return (statistics.median(latencies) if latencies else float("nan")), len(latencies)

    def quality_scores(self, provider: str, seconds: float) -> list[float]:
        """The quality scores of `provider`'s scripts of the last `seconds` (scored ones)."""
        query = sa.select(events.c.quality_score).where(
            events.c.provider == provider,
            events.c.kind == CALL,
            events.c.at >= self.now() - seconds,
            events.c.quality_score.is_not(None),
        )
        with self.engine.connect() as connection:
            return [float(x) for (x,) in connection.execute(query)]

    # --- notices --------------------------------------------------------------------------

    def claim(self, name: str) -> bool:
        """True for the first caller, on any replica, to claim `name` (a warning and its
        period): that one sends it."""
        insert = upsert(self.engine, warning_claims).values(name=name, at=self.now())
        with self.engine.begin() as connection:
            result = connection.execute(insert.on_conflict_do_nothing())
            return result.rowcount == 1

    def swap(self, name: str, value: str, default: str) -> bool:
        """Set notice `name` (`default` until first set) to `value`; True for the one caller,
        on any replica, whose call changed it: that one announces the change."""
        with self.engine.begin() as connection:
            connection.execute(
                upsert(self.engine, notices)
                .values(name=name, value=default)
                .on_conflict_do_nothing()
            )
            changed = connection.execute(
                notices.update()
                .where(notices.c.name == name, notices.c.value != value)
                .values(value=value)
            )
            return changed.rowcount == 1
