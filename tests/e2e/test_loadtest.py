"""The load tests' traffic (`tests/load/`, run by `make loadtest`, not here): every request a
simulated user sends is one the server's request types accept, answers are judged as the
scenarios count them, and the locustfile and runner build.

The locust modules run in a child process: importing locust patches the standard library for
gevent, which this test process must not have."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from serving.backend.tasks import TrendBody
from tests.load.traffic import (
    HISTORY_HOURS,
    HORIZON,
    MIX,
    PATHS,
    Kind,
    Outcome,
    Traffic,
    judge,
    poisson_starts,
    shared_histories,
)
from training.trend.model import TrendRequest

ROOT = Path(__file__).resolve().parents[2]
SHARED = shared_histories()


def calls(kind: Kind, count: int = 200) -> list[dict]:
    traffic = Traffic(["H1", "H2"], seed=7, shared=SHARED)
    return [traffic.next(kind).body for _ in range(count)]


@pytest.mark.parametrize("kind", [Kind.V1_SERIES, Kind.V1_HISTORY])
def test_v1_instances_are_trend_requests(kind: Kind):
    for body in calls(kind):
        (instance,) = body["instances"]
        request = TrendRequest.model_validate(instance)
        assert request.horizon == HORIZON
        assert (request.series_id is None) == (kind is Kind.V1_HISTORY)


def test_task_route_bodies_are_trend_bodies():
    for body in calls(Kind.TASK_ROUTE):
        assert len(TrendBody.model_validate(body).history) == HISTORY_HOURS


def test_histories_mix_repeated_and_fresh():
    histories = [tuple(b["history"]) for b in calls(Kind.TASK_ROUTE, 400)]
    shared = {tuple(h) for h in SHARED}
    repeated = sum(h in shared for h in histories)
    assert 120 < repeated < 280  # about half from the shared pool
    fresh = [h for h in histories if h not in shared]
    assert len(set(fresh)) == len(fresh)  # the rest new to the server's cache
    assert shared_histories() == SHARED  # the same pool in every process


class Clock:
    """`time.monotonic` for `poisson_starts`, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("tests.load.traffic.time.monotonic", clock)
    return clock


def test_users_start_requests_as_a_poisson_stream(clock: Clock):
    rate, user = 4.0, SimpleNamespace()
    wait = poisson_starts(rate, random.Random(1))
    gaps = []
    for _ in range(20_000):  # instant answers: each wait is the whole gap
        gaps.append(wait(user))
        clock.now += gaps[-1]
    gaps = np.asarray(gaps)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps: as spread as they are long (a constant pace has none), and with the
    # exponential's median, ln 2 of the mean.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert np.median(gaps) / gaps.mean() == pytest.approx(np.log(2), abs=0.04)


def test_a_slow_answer_delays_requests_without_lowering_the_rate(clock: Clock):
    rate, user = 2.0, SimpleNamespace()
    wait = poisson_starts(rate, random.Random(2))
    started = clock.now
    sent = 0
    while clock.now - started < 5000:
        # Answers take 40 % of the mean gap, one of them 10 gaps: waiting a gap after each
        # answer would send 1 / (0.5 + 0.2) = 1.4 per second.
        answer = 5.0 if sent == 100 else 0.2
        clock.now += answer
        sent += 1
        pause = wait(user)
        assert pause >= 0
        clock.now += pause
    assert sent / (clock.now - started) == pytest.approx(rate, rel=0.05)


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan")])
def test_poisson_starts_refuses_a_rate_that_is_not_positive(rate: float):
    with pytest.raises(ValueError, match="rate must be positive"):
        poisson_starts(rate)


def test_the_mix_covers_both_protocols():
    assert set(MIX) == set(Kind)
    assert set(PATHS.values()) == {"/v1/models/trend:predict", "/predict/trend"}


def answer(kind: Kind, **fields) -> bytes:
    forecast = {"forecast": [1.0] * HORIZON, "model_version": "3", **fields}
    body = forecast if kind is Kind.TASK_ROUTE else {"predictions": [forecast]}
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("kind", "status", "content", "outcome", "version", "fallback"),
    [
        (Kind.V1_SERIES, 200, answer(Kind.V1_SERIES), Outcome.OK, "3", False),
        (Kind.TASK_ROUTE, 200, answer(Kind.TASK_ROUTE), Outcome.OK, "3", False),
        (
            Kind.TASK_ROUTE,
            200,
            answer(Kind.TASK_ROUTE, fallback=True, model_version="seasonal-naive"),
            Outcome.OK,
            "seasonal-naive",
            True,
        ),
        (Kind.V1_HISTORY, 429, b'{"error": "busy"}', Outcome.REJECTED, None, False),
        (Kind.TASK_ROUTE, 503, b"", Outcome.REJECTED, None, False),
        (Kind.V1_HISTORY, 500, b"boom", Outcome.FAILED, None, False),
        (Kind.V1_HISTORY, 0, None, Outcome.FAILED, None, False),  # no answer
        (Kind.V1_SERIES, 200, b"<html>", Outcome.FAILED, None, False),
        (Kind.V1_SERIES, 200, answer(Kind.TASK_ROUTE), Outcome.FAILED, None, False),
        (
            Kind.TASK_ROUTE,
            200,
            json.dumps({"forecast": [1.0], "model_version": "3"}).encode(),
            Outcome.FAILED,
            None,
            False,
        ),
    ],
)
def test_answers_are_judged_as_the_scenarios_count_them(
    kind, status, content, outcome, version, fallback
):
    judged = judge(kind, status, content)
    assert (judged.outcome, judged.version, judged.fallback) == (outcome, version, fallback)
    assert (judged.problem is not None) == (outcome is Outcome.FAILED)


def test_the_locustfile_and_runner_build():
    script = """
import json
from tests.load.locustfile import TrendUser
from tests.load.run import paced, parse_config
user = paced(2.0)
print(json.dumps({
    "tasks": sorted({t.__name__ for t in TrendUser.tasks}),
    "weights": len(TrendUser.tasks),
    "paced_weights": len(user.tasks),
    "scenarios": list(parse_config(["--scenarios", "cycles"]).scenarios),
}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built["tasks"] == ["task_route", "v1_history", "v1_series"]
    assert built["weights"] == built["paced_weights"] == sum(MIX.values())
    assert built["scenarios"] == ["steady", "cycles"]  # cycles compares with steady's p99
