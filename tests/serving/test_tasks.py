"""The task routes without a server: the seasonal-naive fallback on a real M4 series, the SLA
and error mapping of `answer_within_sla`, and the routes `tasks_router` mounts on a bare app."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from kserve.errors import InvalidInput

from serving.backend.costs import CostLedger
from serving.backend.tasks import (
    MAX_BODY_BYTES,
    MAX_WAITING_PER_TASK,
    TASK_THREADS,
    TASKS,
    ScriptBody,
    Task,
    TaskAnswerer,
    TaskUnavailable,
    TooLate,
    TrendBody,
    answer_within_sla,
    naive_forecast,
    tasks_router,
)
from serving.caller.strategist import ContentStrategist
from serving.model_server.quality import QualityModel, QualityRequest
from tests.conftest import DATA_DIR
from training.data import load_m4_hourly

TREND_ROUTE = TASKS[Task.TREND].route
QUALITY_ROUTE = TASKS[Task.QUALITY].route
SCRIPT_ROUTE = TASKS[Task.SCRIPT].route


@pytest.fixture(scope="module")
def m4_history() -> list[float]:
    frame = load_m4_hourly(DATA_DIR / "m4-hourly" / "Hourly-train.csv", limit=1)
    return frame["interest"].tolist()


@pytest.fixture
def ledger(settings) -> Iterator[CostLedger]:
    ledger = CostLedger.from_settings(settings)
    yield ledger
    ledger.close()


@pytest.fixture
def answerer(settings, ledger) -> TaskAnswerer:
    """No model served: trend falls back, quality is unavailable."""
    return TaskAnswerer(settings, [], ledger)


class Late(TaskAnswerer):
    """Answers only once `release` is set: the test sets it when it has its response, so the
    thread left behind ends before `asyncio.run` waits for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def answer(self, task, bodies, channel=None):
        self.release.wait(timeout=10)
        return super().answer(task, bodies, channel)


class Refusing(TaskAnswerer):
    """Raises `error` for every body, as a model refusing its input or a missing model does."""

    error: Exception

    def answer(self, task, bodies, channel=None):
        raise self.error


def answer_now(answerer: TaskAnswerer, task: Task, body) -> dict | JSONResponse:
    async def call():
        try:
            return await answer_within_sla(answerer, task, body)
        finally:
            if isinstance(answerer, Late):
                answerer.release.set()

    return asyncio.run(call())


def problem(response: JSONResponse) -> str:
    return json.loads(response.body)["detail"]


@pytest.fixture
def short_slas(monkeypatch) -> None:
    """Trend waits 0.2 s (its SLA less the fallback margin), quality 0.2 s."""
    for task, seconds in ((Task.TREND, 0.7), (Task.QUALITY, 0.2)):
        monkeypatch.setitem(TASKS, task, dataclasses.replace(TASKS[task], sla_seconds=seconds))


# --- the seasonal-naive fallback ----------------------------------------------------------


def test_naive_forecast_repeats_the_last_day_of_a_real_series(m4_history: list[float]):
    answer = naive_forecast(TrendBody(history=m4_history, horizon=60, topic="H1"))
    last_day = m4_history[-24:]
    assert answer.forecast == last_day * 2 + last_day[:12]
    assert answer.fallback is True and answer.model_version == "seasonal-naive"
    assert answer.lower is None and answer.upper is None
    assert answer.direction in {"up", "down"} and answer.topic == "H1"


def test_trend_without_a_model_answers_the_naive_fallback(answerer, m4_history):
    body = TrendBody(history=m4_history)
    (answer,) = answerer.answer(Task.TREND, [body])
    assert answer == naive_forecast(body).model_dump()


# --- answer_within_sla --------------------------------------------------------------------


def test_a_late_trend_answer_is_replaced_by_the_fallback(short_slas, settings, ledger, m4_history):
    body = TrendBody(history=m4_history, horizon=12)
    answer = answer_now(Late(settings, [], ledger), Task.TREND, body)
    assert answer == naive_forecast(body).model_dump()
    assert answer["fallback"] is True


def test_a_late_quality_answer_is_504(short_slas, settings, ledger):
    response = answer_now(Late(settings, [], ledger), Task.QUALITY, QualityRequest(text="hello"))
    assert isinstance(response, JSONResponse) and response.status_code == 504
    assert "0.2 s SLA" in problem(response)


@pytest.mark.parametrize(
    ("error", "status"),
    [(InvalidInput("history is odd"), 422), (TaskUnavailable("no provider answers"), 503)],
)
def test_refusals_become_their_status(settings, ledger, error, status):
    answerer = Refusing(settings, [], ledger)
    answerer.error = error
    response = answer_now(answerer, Task.QUALITY, QualityRequest(text="hello"))
    assert isinstance(response, JSONResponse) and response.status_code == status
    assert problem(response) == str(error)


class Counting(Late):
    """`Late`, counting the answers a thread started."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started = 0

    def answer(self, task, bodies, channel=None):
        self.started += 1
        return super().answer(task, bodies, channel)


def test_work_still_waiting_when_its_sla_passes_is_never_started(short_slas, settings, ledger):
    answerer = Counting(settings, [], ledger)
    body = QualityRequest(text="hello")

    async def flood() -> list:
        try:
            return await asyncio.gather(
                *(answer_within_sla(answerer, Task.QUALITY, body) for _ in range(TASK_THREADS + 3))
            )
        finally:
            answerer.release.set()

    responses = asyncio.run(flood())
    assert [r.status_code for r in responses] == [504] * (TASK_THREADS + 3)
    for executor in answerer.executors.values():
        executor.shutdown(wait=True)
    # Only the answers that had a thread before the SLA passed ran; the others were dropped.
    assert answerer.started == TASK_THREADS
    assert answerer.outstanding[Task.QUALITY] == 0


def test_a_full_waiting_room_is_429_at_once_and_a_late_start_is_skipped(settings, ledger):
    answerer = Counting(settings, [], ledger)
    body = QualityRequest(text="hello")
    answerer.outstanding[Task.QUALITY] = TASK_THREADS + MAX_WAITING_PER_TASK
    response = answer_now(answerer, Task.QUALITY, body)
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    assert "quality has 20 answers running or waiting" in problem(response)
    answerer.outstanding[Task.QUALITY] = 0
    answerer.release.set()
    call = functools.partial(answerer.answer, Task.QUALITY, [body])
    skipped = answerer.submit(Task.QUALITY, call, start_by=time.monotonic() - 1)
    with pytest.raises(TooLate):
        skipped.result(timeout=10)
    assert answerer.started == 0 and answerer.outstanding[Task.QUALITY] == 0


def test_quality_without_its_model_is_503(answerer):
    response = answer_now(answerer, Task.QUALITY, QualityRequest(text="hello"))
    assert response.status_code == 503
    assert problem(response) == "the quality model is not served here"


# --- the routes ---------------------------------------------------------------------------


def client_for(answerer: TaskAnswerer) -> TestClient:
    app = FastAPI()
    app.include_router(tasks_router(answerer))
    return TestClient(app)


@pytest.fixture
def with_quality(settings, ledger) -> TaskAnswerer:
    """Quality's predictor, not loaded (no champion): its route is mounted and answers 503."""
    return TaskAnswerer(settings, [QualityModel("quality", settings)], ledger)


def test_openapi_lists_the_three_routes_when_quality_is_served(with_quality):
    paths = client_for(with_quality).get("/openapi.json").json()["paths"]
    assert {TREND_ROUTE, QUALITY_ROUTE, SCRIPT_ROUTE} <= set(paths)
    assert all(set(paths[route]) == {"post"} for route in (TREND_ROUTE, QUALITY_ROUTE))
    assert "413" in paths[TREND_ROUTE]["post"]["responses"]


def test_quality_is_not_mounted_without_its_model(answerer):
    client = client_for(answerer)
    assert QUALITY_ROUTE not in client.get("/openapi.json").json()["paths"]
    assert client.post(QUALITY_ROUTE, json={"text": "hello"}).status_code == 404


def test_quality_route_with_an_unloaded_model_is_503(with_quality):
    response = client_for(with_quality).post(QUALITY_ROUTE, json={"text": "hello"})
    assert response.status_code == 503, response.text


def test_trend_route_answers_the_fallback_without_a_model(answerer, m4_history):
    response = client_for(answerer).post(TREND_ROUTE, json={"history": m4_history})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["fallback"] is True and len(answer["forecast"]) == 48


def test_a_body_over_the_limit_is_413(answerer):
    body = b'{"history": [' + b"1.0, " * (MAX_BODY_BYTES // 5) + b"1.0]}"
    response = client_for(answerer).post(
        TREND_ROUTE, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413, response.text


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        (TREND_ROUTE, {"history": [1.0] * 10}, "history"),
        (TREND_ROUTE, {"history": [1.0] * 48, "horizon": 0}, "horizon"),
        (QUALITY_ROUTE, {"text": "  "}, "text"),
        (SCRIPT_ROUTE, {"topic": "tomatoes"}, "persona"),
    ],
)
def test_a_bad_body_is_422_naming_the_field(with_quality, route, body, field):
    response = client_for(with_quality).post(route, json=body)
    assert response.status_code == 422, response.text
    assert [e["loc"][-1] for e in response.json()["detail"]] == [field]


@pytest.mark.parametrize("field", ["channel", "video_id"])
@pytest.mark.parametrize("value", ["", "   ", "\t", "cook\ning", "a\x1b[31mb", "x" * 201])
def test_a_blank_or_unprintable_id_is_422_before_any_paid_call(settings, ledger, field, value):
    """The ledger refuses such an id; refused only there, the script was already paid for
    (and a batch chunk regenerated it four times)."""

    def no_provider_call() -> ContentStrategist:
        raise AssertionError("the provider chain was reached")

    answerer = TaskAnswerer(settings, [], ledger, strategist=no_provider_call)
    body = {"topic": "tomatoes", "persona": "a gardener", field: value}
    response = client_for(answerer).post(SCRIPT_ROUTE, json=body)
    assert response.status_code == 422, response.text
    assert [e["loc"][-1] for e in response.json()["detail"]] == [field]
    assert ledger.summary() == []


def test_ids_are_stripped():
    body = ScriptBody(topic="t", persona="p", channel=" cooking ", video_id="v1\n")
    assert (body.channel, body.video_id) == ("cooking", "v1")
