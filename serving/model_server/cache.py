"""Prediction caches in front of the predictors: a bounded in-process LRU (one per model, the
default) or Redis (shared by the replicas in the cluster), chosen by `CacheConfig.url`.

A key is the model, the served version and a hash of the canonical JSON of one instance as the
model sees it (after the features a predictor reads from Feast are joined in), so an entry can
never answer for another version or for changed features. A swap keeps the entries: a
rollback finds the previous version's answers still there (emptied at each swap, every common
request was computed again after each promote and rollback), and a version no longer served
ages out of the in-process LRU, or out of Redis after `ttl_seconds`. A cache that fails
(Redis down) only costs the lookup: the request is answered by the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import orjson
import redis
from prometheus_client import Counter

from contentml.errors import UserError

logger = logging.getLogger(__name__)

CACHE_ERRORS = Counter(
    "contentml_cache_errors",
    "Cache lookups or writes that failed (the model answered instead)",
    ["model"],
)

REDIS_RETRY_SECONDS = 30.0
"""After a Redis error the cache is bypassed this long before Redis is tried again."""

REDIS_TIMEOUT_SECONDS = 0.5
"""Connect and read timeout of a cache call: a lookup must stay cheaper than the model."""

OFF = "off"
MEMORY = "memory"


@dataclass(frozen=True)
class CacheConfig:
    """Where predictions are cached, and how many."""

    url: str = MEMORY
    """`memory` (an LRU in the server process, per model), `off`, or `redis://host:port/db`
    (shared by every replica; the cluster's choice)."""

    entries: int = 1_000
    """Entries kept per model by the in-process LRU: the roadmap's top 1000 scenarios."""

    ttl_seconds: int = 3_600
    """Lifetime of a Redis entry; bounds Redis's share (with its `maxmemory-policy`) and ends
    the entries of replaced versions."""

    prefix: str = "contentml:predictions"
    """Redis key prefix: `<prefix>:<model>:<version>:<sha256 of the instance>`."""

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if self.url not in (OFF, MEMORY) and scheme not in ("redis", "rediss", "unix"):
            # The scheme only: a URL may carry a password.
            shown = f"a {scheme}:// URL" if scheme else "a value without a scheme"
            raise UserError(f"cache must be 'memory', 'off' or a redis:// URL, not {shown}")
        if self.entries < 1:
            raise UserError(f"cache entries must be at least 1, not {self.entries}")
        if self.ttl_seconds < 1:
            raise UserError(f"cache ttl_seconds must be at least 1, not {self.ttl_seconds}")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, numpy as plain numbers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_plain)


def instance_hash(instance: Any) -> str:
    """The sha256 of the instance's canonical JSON (sorted keys, no spaces, numpy as plain
    numbers), spelled by orjson: a week of hourly history serializes about 4x faster than with
    `json`, and hashing is on every request's path."""
    return hashlib.sha256(orjson.dumps(instance, option=_CANONICAL)).hexdigest()


_CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY


class PredictionCache(Protocol):
    """One model's cache: answers by instance and served version."""

    def get_many(self, version: str, instances: Sequence[Any]) -> list[dict | None]:
        """The cached answer of each instance under `version`, None where there is none."""
        ...

    def put_many(self, version: str, answers: Iterable[tuple[Any, dict]]) -> None:
        """Remember (instance, answer) pairs under `version`."""
        ...


class LruCache:
    """The `entries` most recently used answers, in this process."""

    def __init__(self, entries: int):
        self.entries = entries
        self._items: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._lock = threading.Lock()  # requests on the event loop, swaps on the watcher

    def __len__(self) -> int:
        return len(self._items)

    def get_many(self, version: str, instances: Sequence[Any]) -> list[dict | None]:
        keys = [(version, instance_hash(i)) for i in instances]
        with self._lock:
            found = [self._items.get(key) for key in keys]
            for key, answer in zip(keys, found, strict=True):
                if answer is not None:
                    self._items.move_to_end(key)
        return found

    def put_many(self, version: str, answers: Iterable[tuple[Any, dict]]) -> None:
        with self._lock:
            for instance, answer in answers:
                key = (version, instance_hash(instance))
                self._items[key] = answer
                self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)


class RedisCache:
    """Answers as JSON strings in Redis, shared by replicas, expiring after `ttl_seconds`."""

    def __init__(self, client: redis.Redis, model: str, prefix: str, ttl_seconds: int):
        self.client = client
        self.model = model
        self.prefix = f"{prefix}:{model}"
        self.ttl_seconds = ttl_seconds
        self._skip_until = 0.0

    def _key(self, version: str, instance: Any) -> str:
        return f"{self.prefix}:{version}:{instance_hash(instance)}"

    def _failed(self, action: str, error: redis.RedisError) -> None:
        # An unreachable Redis would otherwise cost every request its connect timeout.
        self._skip_until = time.monotonic() + REDIS_RETRY_SECONDS
        CACHE_ERRORS.labels(self.model).inc()
        logger.warning(
            "prediction cache %s failed for %s, bypassed for %.0f s: %s",
            action, self.model, REDIS_RETRY_SECONDS, error,
        )  # fmt: skip

    def get_many(self, version: str, instances: Sequence[Any]) -> list[dict | None]:
        if time.monotonic() < self._skip_until:
            return [None] * len(instances)
        try:
            values = self.client.mget([self._key(version, i) for i in instances])
        except redis.RedisError as e:
            self._failed("read", e)
            return [None] * len(instances)
        return [None if v is None else json.loads(v) for v in values]

    def put_many(self, version: str, answers: Iterable[tuple[Any, dict]]) -> None:
        if time.monotonic() < self._skip_until:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for instance, answer in answers:
                    # Not canonical: an answer's key order is its meaning (V2 label columns).
                    value = json.dumps(answer, default=_plain)
                    pipe.set(self._key(version, instance), value, ex=self.ttl_seconds)
                pipe.execute()
        except redis.RedisError as e:
            self._failed("write", e)


def make_cache(config: CacheConfig, model: str) -> PredictionCache | None:
    """The cache `config` names for one model; None when caching is off."""
    if config.url == OFF:
        return None
    if config.url == MEMORY:
        return LruCache(config.entries)
    client = redis.Redis.from_url(
        config.url,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
    )
    return RedisCache(client, model, config.prefix, config.ttl_seconds)
