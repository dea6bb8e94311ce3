"""How each script provider stands today, read from the shared usage store
(`provider_usage`): the chain's contingency, the recommended generation rate, the roadmap's
early warnings (sent once each to the event stream), `contentml providers status` and the
providers' `/metrics` gauges.

- Contingency: a provider past `QUOTA_CONTINGENCY_SHARE` of today's quota is skipped until the
  next UTC day; one past its `max_failures_per_hour` until `cooldown_seconds` after its latest
  failure. While any provider is skipped for either, the recommended generation rate is
  `CONTINGENCY_RATE` (the chain's later providers, ending with our self-hosted model, write the
  scripts); otherwise 1.0.
- Early warnings (the roadmap's figures; `manifests/monitoring/provider-rules.yaml` holds the
  same ones as alert rules): usage above `QUOTA_WARNING_SHARE` of the daily quota before
  `QUOTA_WARNING_BEFORE_HOUR_UTC`; more than `RATE_LIMIT_WARNING_PER_HOUR` rate-limit errors in
  the last hour; a median answer time of the last `CURRENT_WINDOW_SECONDS` above `SLOW_FACTOR`
  times the provider's normal; more than `LOW_QUALITY_SHARE` of a provider's scripts of the
  last day scoring below `LOW_QUALITY_SCORE`. Each goes to the event stream once per day
  (quota) or hour (the others), whichever replica sees it first.
- Keys are named by index only.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from contentml import events
from contentml.settings import Settings
from serving.caller.client import PLACEHOLDER_API_KEY
from serving.caller.provider_keys import chain_keys
from serving.caller.provider_usage import FAILURE, RATE_LIMIT, ProviderUsage, utc_day
from serving.caller.providers_config import ProviderConfig, StrategistConfig, load_config

logger = logging.getLogger(__name__)

HOUR_SECONDS = 3600.0
DAY_SECONDS = 24 * HOUR_SECONDS

QUOTA_WARNING_SHARE = 0.8
QUOTA_WARNING_BEFORE_HOUR_UTC = 18
QUOTA_CONTINGENCY_SHARE = 0.95
RATE_LIMIT_WARNING_PER_HOUR = 5
SLOW_FACTOR = 2.0
LOW_QUALITY_SCORE = 0.7
LOW_QUALITY_SHARE = 0.05
CONTINGENCY_RATE = 0.5

CURRENT_WINDOW_SECONDS = 15 * 60.0
"""The current median answer time is over the calls of the last 15 minutes."""

LEARN_WINDOW_SECONDS = 7 * DAY_SECONDS
"""A learned normal is the median answer time of the 7 days before the current window..."""

LEARN_MIN_CALLS = 20
"""... over at least this many calls; with fewer the provider has no normal yet."""

QUALITY_WINDOW_SECONDS = DAY_SECONDS
"""The low-quality share is over the scripts of the last day."""

METRIC_PREFIX = "contentml_provider_"
QUOTA_METRIC = METRIC_PREFIX + "quota_used_ratio"
REQUESTS_METRIC = METRIC_PREFIX + "requests_today"
RATE_LIMIT_METRIC = METRIC_PREFIX + "rate_limit_errors_last_hour"
FAILURES_METRIC = METRIC_PREFIX + "failures_last_hour"
KEYS_METRIC = METRIC_PREFIX + "keys"
P50_METRIC = METRIC_PREFIX + "latency_p50_seconds"
NORMAL_METRIC = METRIC_PREFIX + "latency_normal_seconds"
LOW_QUALITY_METRIC = METRIC_PREFIX + "low_quality_ratio"
SKIPPED_METRIC = METRIC_PREFIX + "skipped"
RATE_METRIC = "contentml_generation_rate_recommended"
CAPACITY_NOTICE = "capacity.rate"


@dataclass(frozen=True)
class KeyState:
    """One key of a provider, by its index in the provider's key list."""

    index: int
    requests_today: int
    limited_until: float | None
    """UNIX seconds until which it is skipped after a 429; None: not limited."""
    out_of_quota: bool
    """It sent its `daily_quota_per_key` today."""

    @property
    def available(self) -> bool:
        return self.limited_until is None and not self.out_of_quota

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "requests_today": self.requests_today,
            "available": self.available,
            "limited_until": _iso(self.limited_until),
            "out_of_quota": self.out_of_quota,
        }


@dataclass(frozen=True)
class ProviderState:
    """One provider of the chain as the shared store has it now."""

    name: str
    keys: tuple[KeyState, ...]
    """Empty: its key variable or file is unset (the chain skips it)."""
    requests_today: int
    daily_quota: int | None
    """`daily_quota_per_key` x keys; None: no quota."""
    rate_limit_errors_last_hour: int
    failures_last_hour: int
    p50_seconds: float | None
    """Median answer time of the last `CURRENT_WINDOW_SECONDS`; None without calls."""
    normal_seconds: float | None
    normal_source: str | None
    """`configured`, `learned`, or None (fewer than `LEARN_MIN_CALLS` calls to learn from)."""
    low_quality_ratio: float | None
    """Share of its scored scripts of the last day below `LOW_QUALITY_SCORE`; None: none."""
    skipped_until: float | None
    """UNIX seconds until which the chain skips it (contingency); None: not skipped."""
    skip_reason: str | None

    @property
    def quota_used(self) -> float | None:
        if not self.daily_quota:
            return None
        return self.requests_today / self.daily_quota

    @property
    def available_keys(self) -> tuple[int, ...]:
        return tuple(k.index for k in self.keys if k.available)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "requests_today": self.requests_today,
            "daily_quota": self.daily_quota,
            "quota_used": self.quota_used,
            "keys": len(self.keys),
            "keys_available": list(self.available_keys),
            "keys_limited": [k.index for k in self.keys if not k.available],
            "key_states": [k.to_json() for k in self.keys],
            "rate_limit_errors_last_hour": self.rate_limit_errors_last_hour,
            "failures_last_hour": self.failures_last_hour,
            "p50_seconds": self.p50_seconds,
            "normal_p50_seconds": self.normal_seconds,
            "normal_source": self.normal_source,
            "low_quality_ratio": self.low_quality_ratio,
            "skipped": self.skipped_until is not None,
            "skipped_until": _iso(self.skipped_until),
            "skip_reason": self.skip_reason,
        }


@dataclass(frozen=True)
class Capacity:
    """The generation rate the content pipeline should keep to, and why."""

    rate: float
    reason: str
    providers_skipped: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "rate": self.rate,
            "reason": self.reason,
            "providers_skipped": list(self.providers_skipped),
        }


class ProviderMonitor:
    """The chain's providers (`config`, with how many keys each has) against the shared usage
    store; see the module docstring."""

    def __init__(
        self, config: StrategistConfig, key_counts: Mapping[str, int], usage: ProviderUsage
    ) -> None:
        self.config = config
        self.key_counts = {p.name: key_counts.get(p.name, 0) for p in config.providers}
        self.usage = usage

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        environ: Mapping[str, str] | None = None,
        usage: ProviderUsage | None = None,
    ) -> ProviderMonitor:
        """The chain in `settings.script_providers`, its keys counted from `environ` (default
        `os.environ`, read now), on the store at `settings.backend_store` (or `usage`)."""
        config = load_config(settings.script_providers)
        keys = chain_keys(
            config.providers,
            os.environ if environ is None else environ,
            settings.api_token,
            PLACEHOLDER_API_KEY,
        )
        return cls(
            config,
            {name: len(k) for name, k in keys.items()},
            usage or ProviderUsage.from_settings(settings),
        )

    def close(self) -> None:
        self.usage.close()

    def provider(self, name: str) -> ProviderConfig:
        return next(p for p in self.config.providers if p.name == name)

    def state(self, name: str) -> ProviderState:
        """Provider `name` now."""
        provider = self.provider(name)
        usage, now = self.usage, self.usage.now()
        count = self.key_counts[name]
        requests = usage.requests_today(name)
        limited = usage.limited_keys(name)
        per_key = provider.daily_quota_per_key
        keys = tuple(
            KeyState(
                index=i,
                requests_today=requests.get(i, 0),
                limited_until=limited.get(i),
                out_of_quota=per_key is not None and requests.get(i, 0) >= per_key,
            )
            for i in range(count)
        )
        used = sum(requests.get(i, 0) for i in range(count))
        quota = per_key * count if per_key is not None and count else None
        rate_limited = usage.event_times(name, RATE_LIMIT, HOUR_SECONDS)
        failures = usage.event_times(name, FAILURE, HOUR_SECONDS)
        p50, calls = usage.median_latency(name, CURRENT_WINDOW_SECONDS, 0.0)
        normal, source = provider.normal_latency_seconds, "configured"
        if normal is None:
            learned, learned_from = usage.median_latency(
                name, LEARN_WINDOW_SECONDS, CURRENT_WINDOW_SECONDS
            )
            normal, source = (
                (learned, "learned") if learned_from >= LEARN_MIN_CALLS else (None, None)
            )
        scores = usage.quality_scores(name, QUALITY_WINDOW_SECONDS)
        low = sum(score < LOW_QUALITY_SCORE for score in scores) / len(scores) if scores else None

        skipped_until, reason = None, None
        if quota and used >= QUOTA_CONTINGENCY_SHARE * quota:
            tomorrow = utc_day(now) + datetime.timedelta(days=1)
            skipped_until = datetime.datetime.combine(
                tomorrow, datetime.time(), datetime.UTC
            ).timestamp()
            reason = (
                f"{used} of today's {quota} requests used (over "
                f"{QUOTA_CONTINGENCY_SHARE:.0%}): skipped until the next UTC day"
            )
        threshold = provider.max_failures_per_hour
        if threshold is not None and len(failures) > threshold:
            until = failures[-1] + provider.cooldown_seconds
            if until > now and (skipped_until is None or until > skipped_until):
                skipped_until = until
                reason = (
                    f"{len(failures)} failures in the last hour (threshold {threshold}): "
                    f"skipped for {provider.cooldown_seconds:g} s after the latest"
                )
        return ProviderState(
            name=name,
            keys=keys,
            requests_today=used,
            daily_quota=quota,
            rate_limit_errors_last_hour=len(rate_limited),
            failures_last_hour=len(failures),
            p50_seconds=None if math.isnan(p50) or not calls else p50,
            normal_seconds=normal,
            normal_source=source,
            low_quality_ratio=low,
            skipped_until=skipped_until,
            skip_reason=reason,
        )

    def states(self) -> list[ProviderState]:
        return [self.state(p.name) for p in self.config.providers]

    def capacity(self, states: list[ProviderState] | None = None) -> Capacity:
        """The recommended generation rate: `CONTINGENCY_RATE` while any provider is skipped
        for its quota or errors, with why; 1.0 otherwise."""
        states = self.states() if states is None else states
        skipped = [s for s in states if s.skipped_until is not None]
        if not skipped:
            return Capacity(1.0, "every provider is within its quota and error threshold", ())
        writing = [s.name for s in states if s.skipped_until is None and s.keys]
        fallback = f"scripts come from {writing[0]}" if writing else "no provider is left"
        listed = "; ".join(f"{s.name}: {s.skip_reason}" for s in skipped)
        return Capacity(
            CONTINGENCY_RATE,
            f"contingency, {listed}; {fallback}, at half the generation rate",
            tuple(s.name for s in skipped),
        )

    def status(self) -> dict:
        """`contentml providers status --json`: every provider and the capacity."""
        states = self.states()
        return {
            "day": utc_day(self.usage.now()).isoformat(),
            "providers": [s.to_json() for s in states],
            "capacity": self.capacity(states).to_json(),
        }

    def check(self) -> list[ProviderState]:
        """Every provider now, after sending each early warning one is past (once per period,
        across replicas) and a change of the recommended rate (the contingency, with the
        providers skipped and why) to the event stream. Called after each call, so a provider
        the chain skips, or whose keys all answered 429, is warned about too."""
        states = self.states()
        now = self.usage.now()
        day, hour = utc_day(now).isoformat(), int(now // HOUR_SECONDS)
        before_hour = (
            datetime.datetime.fromtimestamp(now, datetime.UTC).hour < QUOTA_WARNING_BEFORE_HOUR_UTC
        )
        for state in states:
            quota_used = state.quota_used
            if (
                quota_used is not None
                and quota_used > QUOTA_WARNING_SHARE
                and before_hour
                and self.usage.claim(f"warning.quota:{state.name}:{day}")
            ):
                logger.warning(
                    "script provider %s: %.0f%% of today's quota used before %02d:00 UTC",
                    state.name, 100 * quota_used, QUOTA_WARNING_BEFORE_HOUR_UTC,
                )  # fmt: skip
                events.publish(
                    events.EventKind.WARNING_QUOTA,
                    {
                        "provider": state.name,
                        "requests_today": state.requests_today,
                        "daily_quota": state.daily_quota,
                        "quota_used": quota_used,
                        "threshold": QUOTA_WARNING_SHARE,
                    },
                )
            for warning, detail in self._provider_warnings(state):
                if self.usage.claim(f"warning.provider:{warning}:{state.name}:{hour}"):
                    logger.warning("script provider %s: %s %s", state.name, warning, detail)
                    events.publish(
                        events.EventKind.WARNING_PROVIDER,
                        {"provider": state.name, "warning": warning, **detail},
                    )
        self._announce(self.capacity(states))
        return states

    def _provider_warnings(self, state: ProviderState) -> Iterator[tuple[str, dict]]:
        if state.rate_limit_errors_last_hour > RATE_LIMIT_WARNING_PER_HOUR:
            yield (
                "rate_limit_errors",
                {
                    "value": state.rate_limit_errors_last_hour,
                    "threshold": RATE_LIMIT_WARNING_PER_HOUR,
                },
            )
        if (
            state.p50_seconds is not None
            and state.normal_seconds is not None
            and state.p50_seconds > SLOW_FACTOR * state.normal_seconds
        ):
            yield (
                "slow",
                {
                    "value": state.p50_seconds,
                    "normal": state.normal_seconds,
                    "threshold": SLOW_FACTOR,
                },
            )
        if state.low_quality_ratio is not None and state.low_quality_ratio > LOW_QUALITY_SHARE:
            yield (
                "low_quality",
                {
                    "value": state.low_quality_ratio,
                    "threshold": LOW_QUALITY_SHARE,
                },
            )

    def _announce(self, capacity: Capacity) -> Capacity:
        """`capacity`, sent to the event stream when its rate is not the last one sent."""
        if self.usage.swap(CAPACITY_NOTICE, repr(capacity.rate), default=repr(1.0)):
            logger.warning("generation rate now %g: %s", capacity.rate, capacity.reason)
            events.publish(events.EventKind.CAPACITY_CHANGED, capacity.to_json())
        return capacity

    def current_capacity(self) -> Capacity:
        """`GET /v1/capacity`: the recommended rate, announced on the event stream when it
        changed since any replica last said."""
        return self._announce(self.capacity())


class ProviderCollector:
    """The providers' `/metrics` gauges, read from the shared store at each scrape, so every
    replica exports the same values (an alert takes their `max`)."""

    def __init__(self, monitor: ProviderMonitor) -> None:
        self.monitor = monitor

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families().values()  # registration asks for the names only

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        provider = ["provider"]
        return {
            QUOTA_METRIC: GaugeMetricFamily(
                QUOTA_METRIC, "Share of today's (UTC) request quota used", labels=provider
            ),
            REQUESTS_METRIC: GaugeMetricFamily(
                REQUESTS_METRIC, "Requests answered today (UTC), all keys", labels=provider
            ),
            RATE_LIMIT_METRIC: GaugeMetricFamily(
                RATE_LIMIT_METRIC, "429 answers in the last hour", labels=provider
            ),
            FAILURES_METRIC: GaugeMetricFamily(
                FAILURES_METRIC, "Failed attempts in the last hour", labels=provider
            ),
            KEYS_METRIC: GaugeMetricFamily(
                KEYS_METRIC, "Keys by state: available or limited", labels=["provider", "state"]
            ),
            P50_METRIC: GaugeMetricFamily(
                P50_METRIC, "Median answer time of the last 15 minutes", labels=provider
            ),
            NORMAL_METRIC: GaugeMetricFamily(
                NORMAL_METRIC, "Normal median answer time (configured or learned)", labels=provider
            ),
            LOW_QUALITY_METRIC: GaugeMetricFamily(
                LOW_QUALITY_METRIC,
                f"Share of the last day's scripts scoring below {LOW_QUALITY_SCORE}",
                labels=provider,
            ),
            SKIPPED_METRIC: GaugeMetricFamily(
                SKIPPED_METRIC, "1 while the chain skips it (quota or errors)", labels=provider
            ),
            RATE_METRIC: GaugeMetricFamily(
                RATE_METRIC, "Recommended generation rate: 1 normally, 0.5 under contingency"
            ),
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            states = self.monitor.states()
        except sa.exc.SQLAlchemyError as e:  # a scrape must not fail for the store
            logger.error("provider metrics: reading the usage store failed: %s", e, exc_info=e)
            return
        families = self._families()
        for s in states:
            label = [s.name]
            optional = {
                QUOTA_METRIC: s.quota_used,
                P50_METRIC: s.p50_seconds,
                NORMAL_METRIC: s.normal_seconds,
                LOW_QUALITY_METRIC: s.low_quality_ratio,
            }
            for metric, value in optional.items():
                if value is not None:
                    families[metric].add_metric(label, value)
            families[REQUESTS_METRIC].add_metric(label, s.requests_today)
            families[RATE_LIMIT_METRIC].add_metric(label, s.rate_limit_errors_last_hour)
            families[FAILURES_METRIC].add_metric(label, s.failures_last_hour)
            available = len(s.available_keys)
            families[KEYS_METRIC].add_metric([s.name, "available"], available)
            families[KEYS_METRIC].add_metric([s.name, "limited"], len(s.keys) - available)
            families[SKIPPED_METRIC].add_metric(label, float(s.skipped_until is not None))
        families[RATE_METRIC].add_metric([], self.monitor.capacity(states).rate)
        yield from families.values()


PROVIDER_METRICS = tuple(ProviderCollector._families())
"""Every metric name the collector exports."""


def register_provider_metrics(
    monitor: ProviderMonitor, registry: CollectorRegistry = REGISTRY
) -> ProviderCollector:
    """Expose `monitor`'s gauges in `registry`, once: a second call (another server in the
    same process, a test) points the registered collector at its monitor instead."""
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = ProviderCollector(monitor)
            registry.register(collector)
        collector.monitor = monitor
        return collector


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, ProviderCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat().replace("+00:00", "Z")
