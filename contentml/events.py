"""The event bus: what just happened on the platform (a batch job moved on, an alias moved, an
alert fired, a warning, a review item), published by whichever process saw it and delivered to
every server process, which streams it to its clients (`GET /v1/events`).

- Publishing: `publish(kind, data, channel)` from anywhere (a request handler, a batch worker,
  the CLI). It never raises into its caller: an unknown kind, data that does not fit the kind's
  schema or a store that cannot be written is logged and counted
  (`contentml_events_failed_total`), and the caller goes on.
- Schemas: one pydantic model per kind (`DATA_MODELS`) checks `data`; `message_schema(kind)` is
  the JSON schema of a whole message of that kind, as the README lists them.
- Delivery (`Settings.event_bus`): `sql` (embedded, the default) writes each event as a row of
  the `events` table in the shared SQL store (`Settings.backend_store`), which every server
  process tails, so a CLI `promote` or a batch worker reaches the server; `redis://host:port/db`
  (the cluster) publishes on a Redis pub/sub channel every replica subscribes to, so a client
  on any replica sees every event.
- `EventHub`: in a server process, a thread per bus followed (the SQL store's always, Redis
  too where configured: a process without the Redis setting, such as a KFP task, still
  reaches the clients) hands each event to the subscribers (WebSocket and SSE clients) whose
  filter takes it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

import prometheus_client
import pydantic
import redis
import sqlalchemy as sa

from contentml.db import open_database
from contentml.names import comma_list
from contentml.settings import Settings

logger = logging.getLogger(__name__)


class EventKind(StrEnum):
    """The fixed set of event kinds; a client filters on them by prefix (`alert.`)."""

    BATCH_PROGRESS = "batch.progress"
    ALIAS_CHANGED = "alias.changed"
    ALERT_DRIFT = "alert.drift"
    ALERT_PERFORMANCE = "alert.performance"
    ANOMALY = "anomaly"
    QUARANTINE = "quarantine"
    WARNING_COST = "warning.cost"
    WARNING_QUOTA = "warning.quota"
    WARNING_PROVIDER = "warning.provider"
    REVIEW_CREATED = "review.created"
    REVIEW_DECIDED = "review.decided"
    REVIEW_EXPIRED = "review.expired"
    CAPACITY_CHANGED = "capacity.changed"


class _Data(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class _OpenData(pydantic.BaseModel):
    """Data of kinds other modules define: the fields named here are required, more may come."""

    model_config = pydantic.ConfigDict(extra="allow")


class BatchProgress(_Data):
    """A batch job's counts after a chunk was answered (and when it was created)."""

    job_id: str
    task: str
    status: Literal["queued", "running", "done", "failed"]
    total: int
    succeeded: int
    failed: int


class AliasChanged(_Data):
    """A registered model's alias moved: a promotion, a rollback, the gate, a registration."""

    model: str
    alias: str
    version: str
    from_version: str | None
    action: str = pydantic.Field(description="promote, rollback, register, gate, ...")
    reason: str


class DriftAlert(_Data):
    """A drift check found the served inputs drifted from the reference."""

    model: str | None = pydantic.Field(description="Null: the shared columns, no one model's.")
    drift_share: float = pydantic.Field(description="Share of the columns that drifted.")
    drifted_columns: list[str]
    threshold: float = pydantic.Field(description="Share of drifted columns that alerts.")
    run_id: str = pydantic.Field(description="The MLflow run holding the drift report.")


class PerformanceAlert(_Data):
    """A model's rolling performance against ground truth fell below its registration's."""

    model: str
    drop: float | None = pydantic.Field(
        description="0.05 = 5 % worse than at registration; null: infinitely worse (the "
        "registered metric was 0)."
    )
    threshold: float


class AnomalyData(_Data):
    """A channel's metric point scored as an anomaly."""

    channel_id: str
    metric: str
    value: float
    baseline: float
    score: float | None = pydantic.Field(description="Robust z-score; null for a new strike.")
    event_timestamp: str


class QuarantineData(_Data):
    """A channel was quarantined (uploads stop) or released."""

    channel_id: str
    quarantined: bool
    reason: str | None


class CostWarning(_Data):
    """The cost per video was above the budget for `streak_length` videos in a row."""

    streak: int
    budget_usd: float
    streak_length: int


class QuotaWarning(_OpenData):
    """A provider passed its share of the daily quota before the warning's hour
    (`serving/caller/provider_monitor.py`)."""

    provider: str
    requests_today: int
    daily_quota: int
    quota_used: float = pydantic.Field(description="requests_today / daily_quota.")
    threshold: float


class ProviderWarning(_OpenData):
    """A provider's early warning (`serving/caller/provider_monitor.py`)."""

    provider: str
    warning: str = pydantic.Field(description="rate_limit_errors, slow or low_quality.")
    value: float
    threshold: float


class ReviewItemData(_OpenData):
    """A review queue item was created, decided or expired (escalated); its text is fetched
    by id (`GET /v1/review/items`)."""

    item_id: str
    status: str
    source: str
    video_id: str | None
    model_version: str | None
    score: float | None
    label: str | None = pydantic.Field(description="The training label a decision gave.")


class CapacityChanged(_OpenData):
    """The recommended generation rate changed (`GET /v1/capacity`)."""

    rate: float
    reason: str
    providers_skipped: list[str]


DATA_MODELS: dict[EventKind, type[pydantic.BaseModel]] = {
    EventKind.BATCH_PROGRESS: BatchProgress,
    EventKind.ALIAS_CHANGED: AliasChanged,
    EventKind.ALERT_DRIFT: DriftAlert,
    EventKind.ALERT_PERFORMANCE: PerformanceAlert,
    EventKind.ANOMALY: AnomalyData,
    EventKind.QUARANTINE: QuarantineData,
    EventKind.WARNING_COST: CostWarning,
    EventKind.WARNING_QUOTA: QuotaWarning,
    EventKind.WARNING_PROVIDER: ProviderWarning,
    EventKind.REVIEW_CREATED: ReviewItemData,
    EventKind.REVIEW_DECIDED: ReviewItemData,
    EventKind.REVIEW_EXPIRED: ReviewItemData,
    EventKind.CAPACITY_CHANGED: CapacityChanged,
}
"""Each kind's data schema."""


class Event(pydantic.BaseModel):
    """One message as clients receive it (a WebSocket text frame, an SSE `data:` line)."""

    id: str = pydantic.Field(description="Unique per event (a UUID).")
    kind: EventKind
    channel: str | None = pydantic.Field(description="The content channel it concerns, if one.")
    time: str = pydantic.Field(description="When it was published, ISO 8601 UTC.")
    data: dict[str, Any]


def message_schema(kind: EventKind) -> dict[str, Any]:
    """The JSON schema of a whole message of `kind`: the envelope with its data's schema."""
    typed = pydantic.create_model(
        f"{DATA_MODELS[kind].__name__}Event",
        __base__=Event,
        kind=(Literal[kind.value], ...),
        data=(DATA_MODELS[kind], ...),
    )
    return typed.model_json_schema()


def make_event(kind: str, data: dict[str, Any], channel: str | None = None) -> Event:
    """An event of `kind` with `data` checked against its schema (ValueError when it does not
    fit, naming the kind and the field)."""
    try:
        event_kind = EventKind(kind)
    except ValueError:
        raise ValueError(
            f"unknown event kind {kind!r}; known: {', '.join(k.value for k in EventKind)}"
        ) from None
    try:
        checked = DATA_MODELS[event_kind].model_validate(data)
    except pydantic.ValidationError as e:
        raise ValueError(f"{kind} data does not fit its schema: {e}") from e
    now = datetime.datetime.now(datetime.UTC)
    return Event(
        id=uuid.uuid4().hex,
        kind=event_kind,
        channel=channel,
        time=now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        data=checked.model_dump(mode="json"),
    )


PUBLISHED = prometheus_client.Counter(
    "contentml_events_published", "Events published to the event bus", ["kind"]
)
FAILED = prometheus_client.Counter(
    "contentml_events_failed",
    "Events not published: unknown kind, data not fitting its schema, or the bus unreachable",
    ["kind"],
)


class Bus(Protocol):
    """Where events go between processes."""

    def send(self, event: Event) -> None: ...

    def follow(
        self, deliver: Callable[[Event], None], stop: threading.Event, ready: threading.Event
    ) -> None:
        """Call `deliver` with each event published once `ready` is set, until `stop` is."""

    def close(self) -> None: ...


FOLLOW_POLL_SECONDS = 0.2
"""How often a server looks for new events in the SQL store (or wakes to check it should stop)."""

SQL_RETENTION_SECONDS = 24 * 3600.0
"""Events older than this are deleted from the SQL store (clients only see new ones)."""

metadata = sa.MetaData()
events_table = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("published_at", sa.Float, nullable=False, index=True),
    sa.Column("body", sa.Text, nullable=False),
)


class SqlBus:
    """Events as rows of the shared SQL store's `events` table, followed by their sequence."""

    def __init__(self, url: str):
        self.engine = open_database(url, metadata)

    def send(self, event: Event) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                events_table.insert().values(published_at=time.time(), body=event.model_dump_json())
            )

    def latest(self) -> int:
        with self.engine.connect() as connection:
            newest = connection.scalar(sa.select(sa.func.max(events_table.c.seq)))
        return newest or 0

    def after(self, seq: int, limit: int = 500) -> list[tuple[int, Event]]:
        """Events written after sequence number `seq`, oldest first."""
        query = (
            sa.select(events_table.c.seq, events_table.c.body)
            .where(events_table.c.seq > seq)
            .order_by(events_table.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [(row.seq, Event.model_validate_json(row.body)) for row in rows]

    def prune(self, older_than: float) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                events_table.delete().where(events_table.c.published_at < older_than)
            )

    def follow(
        self, deliver: Callable[[Event], None], stop: threading.Event, ready: threading.Event
    ) -> None:
        seq = self.latest()
        ready.set()
        pruned = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() - pruned > 3600:
                    self.prune(time.time() - SQL_RETENTION_SECONDS)
                    pruned = time.monotonic()
                for newer, event in self.after(seq):
                    deliver(event)
                    seq = newer
            except sa.exc.SQLAlchemyError as e:  # a store restart: keep following
                logger.warning("reading events from the SQL store failed; retrying: %s", e)
            stop.wait(FOLLOW_POLL_SECONDS)

    def close(self) -> None:
        self.engine.dispose()


REDIS_CHANNEL = "contentml.events"
"""The Redis pub/sub channel every replica publishes on and subscribes to."""


class RedisBus:
    """Events through Redis pub/sub: delivered to every replica subscribed at that moment."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)

    def send(self, event: Event) -> None:
        self.client.publish(REDIS_CHANNEL, event.model_dump_json())

    def follow(
        self, deliver: Callable[[Event], None], stop: threading.Event, ready: threading.Event
    ) -> None:
        while not stop.is_set():
            try:
                with self.client.pubsub() as pubsub:
                    pubsub.subscribe(REDIS_CHANNEL)
                    while not stop.is_set():
                        message = pubsub.get_message(timeout=FOLLOW_POLL_SECONDS)
                        if message is None:
                            continue
                        if message["type"] == "subscribe":  # Redis confirmed: we are on
                            ready.set()
                        elif message["type"] == "message":
                            deliver(Event.model_validate_json(message["data"]))
            except redis.RedisError as e:  # Redis restarted: subscribe again
                logger.warning("the Redis event subscription failed; retrying: %s", e)
                stop.wait(1.0)

    def close(self) -> None:
        self.client.close()


def open_bus(settings: Settings) -> Bus:
    """The bus `settings.event_bus` names."""
    if settings.event_bus == "sql":
        return SqlBus(settings.backend_store)
    return RedisBus(settings.event_bus)


def followed_buses(settings: Settings) -> list[Bus]:
    """What a server follows: the SQL store's events always (a process without the Redis
    setting, a KFP task, publishes there), and Redis pub/sub where `settings.event_bus` names
    it. Each event travels one of them, never both."""
    buses: list[Bus] = [SqlBus(settings.backend_store)]
    if settings.event_bus != "sql":
        buses.append(RedisBus(settings.event_bus))
    return buses


_process_settings: Settings | None = None
_process_bus: Bus | None = None
_process_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Make `settings`' bus the one this process publishes to, opened at the first publish
    (servers and workers call it when they start; tests with their own state folder too). A
    process that never calls it publishes to its environment's settings' bus."""
    global _process_settings, _process_bus
    with _process_lock:
        previous, _process_bus, _process_settings = _process_bus, None, settings
    if previous is not None:
        previous.close()


def _bus() -> Bus:
    global _process_bus
    with _process_lock:
        if _process_bus is None:
            _process_bus = open_bus(_process_settings or Settings.from_env())
        return _process_bus


def publish(kind: str, data: dict[str, Any], channel: str | None = None) -> None:
    """Publish an event of `kind` (an `EventKind` value) with `data` fitting its schema, about
    content `channel` if given. Never raises: a failure is logged and counted."""
    try:
        event = make_event(kind, data, channel)
        _bus().send(event)
    except Exception as e:  # the contract: an event lost never fails what it reports on
        FAILED.labels(kind=str(kind)[:40]).inc()
        logger.error("event %s not published: %s", kind, e, exc_info=e)
        return
    PUBLISHED.labels(kind=event.kind.value).inc()


@dataclass(frozen=True)
class EventFilter:
    """Which events a client wants: kinds by exact value or prefix (`alert.` or `alert`),
    and content channels; empty means all."""

    kinds: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()

    @classmethod
    def parse(cls, kinds: Iterable[str] = (), channels: Iterable[str] = ()) -> EventFilter:
        """From query values (each may be comma-separated); ValueError naming a kind prefix
        that matches no kind."""
        kind_list = tuple(kind for item in kinds for kind in comma_list(item))
        for prefix in kind_list:
            if not any(_kind_matches(kind.value, prefix) for kind in EventKind):
                raise ValueError(
                    f"kind {prefix!r} matches no event kind; known: "
                    f"{', '.join(k.value for k in EventKind)}"
                )
        channel_list = tuple(channel for item in channels for channel in comma_list(item))
        return cls(kind_list, channel_list)

    def takes(self, event: Event) -> bool:
        if self.kinds and not any(_kind_matches(event.kind.value, k) for k in self.kinds):
            return False
        return not self.channels or event.channel in self.channels


def _kind_matches(kind: str, prefix: str) -> bool:
    prefix = prefix.removesuffix(".")
    return kind == prefix or kind.startswith(prefix + ".")


SUBSCRIBER_BACKLOG = 1000
"""Events a subscriber may have waiting; a client that falls further behind is dropped (it
reconnects) rather than holding the server's memory."""

STREAMS_CLOSE_SECONDS = 2.0
"""How long a stopping server waits for its ended streams' clients to leave."""


class Subscription:
    """One client's events, in order, as an async iterator; ends when the hub stops or the
    client fell `SUBSCRIBER_BACKLOG` events behind (`overflowed`)."""

    def __init__(self, event_filter: EventFilter, loop: asyncio.AbstractEventLoop):
        self.filter = event_filter
        self.loop = loop
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.overflowed = False
        self.left = asyncio.Event()
        """Set once the client is gone (`EventHub.unsubscribe`)."""

    def _offer(self, event: Event | None) -> None:  # on the subscriber's loop
        if event is not None and self.queue.qsize() >= SUBSCRIBER_BACKLOG:
            self.overflowed = True
            event = None
        self.queue.put_nowait(event)

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event, None once the subscription ended; TimeoutError after `timeout`
        seconds without one (the subscription goes on)."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while (event := await self.next()) is not None:
            yield event


class EventHub:
    """A server process's follower of the buses (`followed_buses`), fanning each event out to
    its subscribers."""

    def __init__(self, buses: Sequence[Bus]):
        self.buses = list(buses)
        self._subscribers: set[Subscription] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = [threading.Event() for _ in self.buses]
        self._threads = [
            threading.Thread(
                target=bus.follow, args=(self._deliver, self._stop, ready), daemon=True,
                name=f"event-hub-{type(bus).__name__}",
            )
            for bus, ready in zip(self.buses, self._ready, strict=True)
        ]  # fmt: skip

    def start(self) -> EventHub:
        for thread in self._threads:
            thread.start()
        return self

    def wait_ready(self, timeout: float) -> bool:
        """Whether the hub follows every bus within `timeout` seconds: events published from
        then on reach it."""
        deadline = time.monotonic() + timeout
        return all(ready.wait(max(0.0, deadline - time.monotonic())) for ready in self._ready)

    def stop(self) -> None:
        """Stop following the buses (and close them) and end every subscription."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for bus in self.buses:
            bus.close()
        self.end_subscriptions()

    def end_subscriptions(self) -> list[Subscription]:
        """End every subscription now (a server about to stop: its clients reconnect to
        another replica instead of holding its shutdown up). Returns the ended ones."""
        with self._lock:
            subscribers, self._subscribers = self._subscribers, set()
        for subscription in subscribers:
            self._hand(subscription, None)
        return list(subscribers)

    async def close_streams(self, timeout: float = STREAMS_CLOSE_SECONDS) -> None:
        """End every subscription and wait, up to `timeout` seconds, until their clients are
        gone: a server that stopped first would cut the streams itself (WebSocket close
        1012, "restart") instead of saying it is going away (1001)."""
        ended = self.end_subscriptions()
        if ended:
            waits = asyncio.gather(*(subscription.left.wait() for subscription in ended))
            try:
                await asyncio.wait_for(waits, timeout)
            except TimeoutError:
                still_open = sum(not subscription.left.is_set() for subscription in ended)
                logger.warning("%d event streams still open after %g s", still_open, timeout)

    def _deliver(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            if subscription.filter.takes(event):
                self._hand(subscription, event)

    @staticmethod
    def _hand(subscription: Subscription, event: Event | None) -> None:
        try:
            subscription.loop.call_soon_threadsafe(subscription._offer, event)
        except RuntimeError:  # its loop closed: the client is gone
            pass

    def subscribe(self, event_filter: EventFilter) -> Subscription:
        """A subscription on the calling event loop; `unsubscribe` it when the client leaves."""
        subscription = Subscription(event_filter, asyncio.get_running_loop())
        with self._lock:
            self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """The client left; called on the subscription's loop."""
        with self._lock:
            self._subscribers.discard(subscription)
        subscription.left.set()

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)
