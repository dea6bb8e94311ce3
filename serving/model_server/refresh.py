"""What predictors hold in memory instead of reading a store per request, kept current by a
background thread: a request reads memory, and what it reads is never staler than the refresh
interval (`Settings.serving_poll_seconds`).

- `HeldLookups`: values by key (the trend model's online histories by series id from Feast,
  the bandits' experiments and arm totals from the revenue store), read through on a key's
  first use, written through by this process's own writes, re-read together at each refresh
  (which is how another replica's writes arrive).
- `Refresher`: one daemon thread per holder that calls its `refresh` every interval; a failed
  refresh (the store unreachable) is logged and counted, and what is held keeps answering.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Counter, Histogram

from contentml.errors import UserError

logger = logging.getLogger(__name__)

REFRESH_FAILURES = Counter(
    "contentml_memory_refresh_failures",
    "Background refreshes of in-memory state that failed (the state held kept answering)",
    ["holder"],
)
REFRESH_SECONDS = Histogram(
    "contentml_memory_refresh_seconds",
    "Time of one background refresh of in-memory state from its store",
    ["holder"],
)

Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


class HeldLookups(Generic[Key, Value]):
    """The `entries` most recently used values of a store lookup `read(keys) -> {key: value}`,
    held in memory. A key not held is read through on its request; `refresh` reads every held
    key again in batches of `batch`, so a value changed in the store is answered within one
    refresh interval."""

    def __init__(
        self,
        read: Callable[[list[Key]], dict[Key, Value]],
        entries: int = 10_000,
        batch: int = 1_000,
    ):
        if entries < 1 or batch < 1:
            raise UserError(f"entries and batch must be at least 1, not {entries}, {batch}")
        self.read = read
        self.entries = entries
        self.batch = batch
        self._held: OrderedDict[Key, Value] = OrderedDict()
        self._lock = threading.Lock()  # requests on several threads, refreshes on another
        # A refresh that read a key before a write through this process must not put the
        # older value back: each write is numbered, and a refresh skips keys written since
        # it started reading.
        self._writes = 0
        self._written_at: dict[Key, int] = {}

    def __len__(self) -> int:
        return len(self._held)

    def get_many(self, keys: Sequence[Key]) -> dict[Key, Value]:
        """Each key's value: from memory, or read from the store (and then held)."""
        found: dict[Key, Value] = {}
        with self._lock:
            for key in keys:
                if key in self._held:
                    found[key] = self._held[key]
                    self._held.move_to_end(key)
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            read = self.read(missing)
            self._hold(read)
            found.update(read)
        return found

    def update(self, key: Key, change: Callable[[Value], Value]) -> None:
        """Write through: hold `change(value)` for `key` after a write this process has just
        made to the store (a key not held is read first)."""
        found = self.get_many([key])[key]
        with self._lock:
            self._writes += 1
            self._written_at[key] = self._writes
            self._held[key] = change(self._held.get(key, found))
            self._held.move_to_end(key)

    def refresh(self) -> None:
        """Read every held key again; keys evicted meanwhile are not brought back."""
        with self._lock:
            keys = list(self._held)
            started = self._writes
            self._written_at.clear()
        for start in range(0, len(keys), self.batch):
            fresh = self.read(keys[start : start + self.batch])
            with self._lock:
                for key, value in fresh.items():
                    if key in self._held and self._written_at.get(key, 0) <= started:
                        self._held[key] = value

    def _hold(self, values: dict[Key, Value]) -> None:
        with self._lock:
            for key, value in values.items():
                self._held[key] = value
                self._held.move_to_end(key)
            while len(self._held) > self.entries:
                self._held.popitem(last=False)


class Refresher:
    """Calls `refresh` every `seconds` on a daemon thread until `stop`."""

    def __init__(self, holder: str, refresh: Callable[[], None], seconds: float):
        if not seconds > 0:
            raise UserError(f"a refresh interval must be positive, not {seconds}")
        self.holder = holder
        self.refresh = refresh
        self.seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"refresh-{holder}", daemon=True)

    def start(self) -> Refresher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            started = time.perf_counter()
            try:
                self.refresh()
            except Exception as e:  # the store unreachable: keep what is held, try again
                REFRESH_FAILURES.labels(self.holder).inc()
                logger.warning("refreshing %s from its store failed: %s", self.holder, e)
            finally:
                REFRESH_SECONDS.labels(self.holder).observe(time.perf_counter() - started)
