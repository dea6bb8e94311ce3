"""The trend traffic of the load tests: what a simulated user sends and how an answer is judged.

Three kinds of request, in the proportions of `MIX`:
- V1 by series id: a series the champion was trained on, answered from its precomputed forecast.
- V1 by history: half from a pool every user shares (answered from the prediction cache after
  the first time), half fresh (fitted on request).
- `POST /predict/trend`: the backend's task route, the same split of histories.

No locust here: the unit tests import this module without gevent patching their process.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

HORIZON = 48
HISTORY_HOURS = 14 * 24
"""Two weeks of hourly interest per history: the window the batch benchmark sends too."""

SHARED_HISTORIES = 64
"""Histories every user sends again and again; far fewer than the prediction cache holds."""

SHARED_SHARE = 0.5
"""Share of history requests taken from the shared pool (the rest are new to the server)."""

REJECTION_STATUSES = frozenset({429, 503})
"""Backpressure: the server refuses the request at once instead of queueing it."""


class Kind(StrEnum):
    """A kind of request; its value is the name locust's statistics show."""

    V1_SERIES = "v1 series_id"
    V1_HISTORY = "v1 history"
    TASK_ROUTE = "/predict/trend"


PATHS = {
    Kind.V1_SERIES: "/v1/models/trend:predict",
    Kind.V1_HISTORY: "/v1/models/trend:predict",
    Kind.TASK_ROUTE: "/predict/trend",
}

MIX = {Kind.V1_SERIES: 4, Kind.V1_HISTORY: 3, Kind.TASK_ROUTE: 3}
"""Relative weights of the kinds (locust task weights)."""


class Outcome(StrEnum):
    OK = "ok"  # 2xx with a well-formed answer
    REJECTED = "rejected"  # 429/503: backpressure
    FAILED = "failed"  # anything else: another status, a malformed answer, no answer


@dataclass(frozen=True)
class Call:
    kind: Kind
    body: dict[str, Any]

    @property
    def path(self) -> str:
        return PATHS[self.kind]


@dataclass(frozen=True)
class Answer:
    outcome: Outcome
    version: str | None = None
    """The registered version that answered (`seasonal-naive` for a task-route fallback)."""
    fallback: bool = False
    """A task-route forecast replaced because the model was late or failed."""
    problem: str | None = None


def synthetic_history(rng: np.random.Generator) -> list[float]:
    """An hourly interest series shaped like the M4 hourly ones: a level, daily and weekly
    seasonality, a drift and noise, never negative."""
    hours = np.arange(HISTORY_HOURS)
    level = rng.uniform(50, 5_000)
    daily = rng.uniform(0.1, 0.5) * level * np.sin(2 * np.pi * (hours + rng.integers(24)) / 24)
    weekly = rng.uniform(0.0, 0.2) * level * np.sin(2 * np.pi * hours / 168)
    drift = rng.uniform(-0.001, 0.001) * level * hours
    noise = rng.normal(0, 0.05 * level, HISTORY_HOURS)
    return np.clip(level + daily + weekly + drift + noise, 0, None).round(2).tolist()


def shared_histories() -> list[list[float]]:
    """The pool every user draws repeated histories from (the same in every process)."""
    rng = np.random.default_rng(0)
    return [synthetic_history(rng) for _ in range(SHARED_HISTORIES)]


class Traffic:
    """One user's stream of requests."""

    def __init__(self, series_ids: Sequence[str], seed: int, shared: Sequence[list[float]]):
        if not series_ids:
            raise ValueError("give at least one series id the server has a forecast for")
        self.series_ids = list(series_ids)
        self.shared = list(shared)
        self.rng = np.random.default_rng(seed)

    def history(self) -> list[float]:
        if self.rng.random() < SHARED_SHARE:
            return self.shared[self.rng.integers(len(self.shared))]
        return synthetic_history(self.rng)

    def next(self, kind: Kind) -> Call:
        if kind is Kind.V1_SERIES:
            series_id = self.series_ids[self.rng.integers(len(self.series_ids))]
            return Call(kind, {"instances": [{"series_id": series_id, "horizon": HORIZON}]})
        if kind is Kind.V1_HISTORY:
            return Call(kind, {"instances": [{"history": self.history(), "horizon": HORIZON}]})
        return Call(kind, {"history": self.history(), "horizon": HORIZON})


def poisson_starts(rate: float, rng: random.Random | None = None) -> Callable[[Any], float]:
    """A locust `wait_time` that starts a user's requests as a Poisson process of `rate` per
    second: exponential gaps from one start to the next, so many users together send a Poisson
    stream of their total rate, as independent clients do. A request that outlasts its gap
    delays the next ones, which then follow without a pause until the schedule is kept again.

    Not locust's `constant_throughput`: it keeps each user's phase, so one pause of the server
    or the load generator (a garbage collection) lines the users up for good. At 2x saturation
    it had 99 % of the requests arriving in bursts, up to 283 within 10 ms, which every
    server answers in turn. Not locust's `poisson` either: it waits after each answer, so slow
    answers lower the rate sent (1.7x capacity instead of 2x). `rng`: the gaps' source (None: a
    new one seeded by the system)."""
    if not rate > 0:
        raise ValueError(f"the rate must be positive, not {rate}")
    gaps = rng or random.Random()

    def wait(user: Any) -> float:
        now = time.monotonic()
        start = getattr(user, "_poisson_start", now) + gaps.expovariate(rate)
        user._poisson_start = start
        return max(0.0, start - now)

    return wait


def judge(kind: Kind, status: int, content: bytes | None) -> Answer:
    """What an answer to a `kind` request (status 0: none came) means for the load test."""
    if status in REJECTION_STATUSES:
        return Answer(Outcome.REJECTED)
    if not 200 <= status < 300:
        detail = (content or b"no answer")[:200].decode(errors="replace")
        return Answer(Outcome.FAILED, problem=f"{status}: {detail}")
    try:
        body = json.loads(content or b"")
        forecast = body["predictions"][0] if kind is not Kind.TASK_ROUTE else body
        version = str(forecast["model_version"])
        points = len(forecast["forecast"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return Answer(Outcome.FAILED, problem=f"{status} with a malformed answer: {e!r}")
    if points != HORIZON:
        return Answer(Outcome.FAILED, problem=f"{points} forecast points, asked for {HORIZON}")
    return Answer(Outcome.OK, version, fallback=bool(body.get("fallback", False)))
