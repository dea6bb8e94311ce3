"""The backend's task routes: plain JSON for services that do not speak KServe's V1/V2, one
route per task, each answered within its SLA (the backend team's contract):

    POST /predict/trend    5 s   {"history": [hourly floats], "horizon": 48, "topic": "id"}
                                 -> {"forecast": [...], "model_version", "fallback": false, ...}
    POST /score/quality    2 s   {"text": "...", "channel": "optional", "video_id": "optional"}
                                 -> {"score", "decision": "pass|review|reject", "reasons",
                                     "model_version", "review_item"}
    POST /generate/script 30 s   {"topic": "...", "persona": "...", "channel": "optional"}
                                 -> {"script", "provider", "cost_usd", ...}

A route hands its body to the predictor that serves the model in this process (the same
answer as `/v1/models/<name>:predict`, so the prediction cache, the log and the metrics see it),
or for scripts to the ContentStrategist's provider chain. `TaskAnswerer.answer` takes a list of
bodies: the batch workers (`serving/backend/batch/`) answer a chunk of items with it.

SLAs are enforced here: the answer runs in a thread and the route stops waiting at the SLA.
Work still waiting for a thread then is cancelled, and a thread that picks up work whose wait
is over skips it; each task's pool takes `MAX_WAITING_PER_TASK` waiting answers, and 429 beyond.
- trend: a forecast that is late or fails (or no trend model served) is replaced by the cached
  forecast of the same request, else the seasonal-naive one, marked `"fallback": true`.
- quality: late is 504 with a body saying so; no model is 503.
- script: the chain falls back from provider to provider within a deadline of the SLA less
  `SCRIPT_ANSWER_MARGIN_SECONDS`, so a hung provider gives way to the next in time; a chain whose
  every provider failed (or had too little time left) is 503 with each provider's reason, one
  that is still late is 504.
Bodies are the predictors' own request types (`TrendBody` is the trend model's `TrendRequest`
with its history required, `/score/quality` takes `QualityRequest`), validated once (422 naming
the field; FastAPI's `detail` list) and answered by the predictor's typed `answer(requests)`;
bodies larger than `MAX_BODY_BYTES` are 413 (FastAPI's `max_body_size`). The OpenAPI schema at
`/openapi.json` describes every route and body.

Every quality `review` answered here (a route's, a batch item's) is queued for a person
(`training/quality/review_store.py`), and the answer names the item (`review_item`); a script's
is queued by the strategist, with the script's channel and video.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
import pydantic
from fastapi import APIRouter, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput
from kserve.model import BaseKServeModel

from contentml.errors import UserError
from contentml.protocol import TASK_ROUTES, Task
from contentml.runtime import one_native_thread
from contentml.settings import Settings
from serving.backend.costs import MAX_NAME, BookedName, CostEntry, CostLedger, compute_cost
from serving.caller.client import ClientError, ContentMLClientError
from serving.caller.strategist import AllProvidersFailed, ContentStrategist
from serving.model_server.quality import MAX_TEXT_CHARS, QualityModel, QualityRequest
from serving.model_server.versions import CachedPredictor
from training.quality.review_store import Source
from training.trend.metrics import direction, seasonal_naive
from training.trend.model import MAX_HISTORY, MAX_HORIZON, MAX_SERIES_ID, MIN_HISTORY, TrendRequest

logger = logging.getLogger(__name__)

UNASSIGNED_CHANNEL = "unassigned"
"""The channel costs are booked to when a request names none."""

TASK_THREADS = 4
"""Answers of one task computed at once in a server; more wait for a thread (within the SLA)."""

MAX_WAITING_PER_TASK = 4 * TASK_THREADS
"""Answers of one task waiting for a thread at most; the next request is 429 at once. Work a
route gave up on (past its SLA) counts until its thread ends, so overload cannot pile up
stale work behind the threads."""

BUSY_RETRY_AFTER_SECONDS = 1

TREND_FALLBACK_MARGIN_SECONDS = 0.5
"""Time kept back from the trend SLA to compute the fallback and answer."""

SCRIPT_ANSWER_MARGIN_SECONDS = 1.0
"""Time kept back from the script SLA to score the script and answer: the rest is the
provider chain's deadline."""


# --- bodies and answers --------------------------------------------------------------------


class TrendBody(TrendRequest):
    """The trend predictor's request as the task route takes it: the history is required and
    the series id is called `topic`. `TrendRequest` checks it; the fields here document it."""

    series_id: str | None = pydantic.Field(
        None,
        validation_alias="topic",
        serialization_alias="topic",
        min_length=1,
        max_length=MAX_SERIES_ID,
        description="The topic's series id: a series the model was fitted on is answered "
        "from its precomputed forecast while the history still ends as it did.",
    )
    history: list[float] = pydantic.Field(  # type: ignore[assignment]
        min_length=MIN_HISTORY,
        max_length=MAX_HISTORY,
        description="Hourly interest of the topic, oldest first.",
    )
    horizon: int = pydantic.Field(48, ge=1, le=MAX_HORIZON, description="Hours to forecast.")


class TrendAnswer(pydantic.BaseModel):
    forecast: list[float]
    lower: list[float] | None = pydantic.Field(description="80 % interval; null in a fallback.")
    upper: list[float] | None
    direction: str = pydantic.Field(description="`up` or `down` against the last hours.")
    model_version: str = pydantic.Field(
        description="The registered version that answered, or `seasonal-naive`."
    )
    fallback: bool = pydantic.Field(
        description="True when the model was late or failed and a cached or seasonal-naive "
        "forecast answered instead."
    )
    topic: str | None = None


class QualityAnswer(pydantic.BaseModel):
    score: float
    decision: str = pydantic.Field(description="`pass`, `review` (a person decides) or `reject`.")
    reasons: list[dict[str, Any]] = pydantic.Field(description="Why it did not pass.")
    model_version: str
    review_item: str | None = pydantic.Field(
        None, description="The review queue's item for a `review` (`GET /v1/review/items`)."
    )


class ScriptBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    topic: str = pydantic.Field(min_length=1, max_length=500)
    persona: str = pydantic.Field(min_length=1, max_length=2_000)
    target_seconds: int = pydantic.Field(60, ge=5, le=1_200, description="Spoken length.")
    channel: BookedName | None = pydantic.Field(
        None, max_length=MAX_NAME, description="Channel the cost is booked to."
    )
    video_id: BookedName | None = pydantic.Field(
        None, max_length=MAX_NAME, description="Video the cost is booked to."
    )

    @pydantic.field_validator("topic", "persona")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class ScriptAnswer(pydantic.BaseModel):
    script: str
    provider: str = pydantic.Field(description="The provider of the chain that wrote it.")
    cost_usd: float = pydantic.Field(description="Tokens x the provider's price + compute.")
    cached: bool
    quality_decision: str
    quality_score: float | None
    quality_reasons: list[str]


@dataclass(frozen=True)
class TaskSpec:
    route: str
    sla_seconds: float
    body: type[pydantic.BaseModel]
    answer: type[pydantic.BaseModel]
    model: str
    """The served model the route maps onto."""


_SHAPES: dict[Task, tuple[type[pydantic.BaseModel], type[pydantic.BaseModel]]] = {
    Task.TREND: (TrendBody, TrendAnswer),
    Task.QUALITY: (QualityRequest, QualityAnswer),
    Task.SCRIPT: (ScriptBody, ScriptAnswer),
}

TASKS: dict[Task, TaskSpec] = {
    task: TaskSpec(route.route, route.sla_seconds, *_SHAPES[task], route.model)
    for task, route in TASK_ROUTES.items()
}
"""Each task's route, SLA and model (`contentml.protocol.TASK_ROUTES`) with its body and
answer."""


# --- answering -----------------------------------------------------------------------------


class TaskUnavailable(Exception):
    """Nothing here can answer the task now (no model served, every provider failed): 503,
    and a batch item is retried."""


class TaskBusy(Exception):
    """The task's threads and its waiting room are full: 429."""


class TooLate(Exception):
    """Work whose caller stopped waiting before a thread took it: skipped."""


class QualityUnavailable(ContentMLClientError):
    """The in-process quality model could not score a script (the strategist sends it to
    review)."""


def naive_forecast(body: TrendBody) -> TrendAnswer:
    """The seasonal-naive forecast: yesterday repeated, the floor every model must beat."""
    history = np.asarray(body.history, dtype=float)
    point = seasonal_naive(history, body.horizon)
    return TrendAnswer(
        forecast=point.tolist(),
        lower=None,
        upper=None,
        direction="up" if direction(history, point) > 0 else "down",
        model_version="seasonal-naive",
        fallback=True,
        topic=body.series_id,
    )


def _trend_answer(prediction: Mapping[str, Any], body: TrendBody, fallback: bool) -> TrendAnswer:
    return TrendAnswer(
        forecast=prediction["forecast"],
        lower=prediction["lower"],
        upper=prediction["upper"],
        direction=prediction["direction"],
        model_version=str(prediction["model_version"]),
        fallback=fallback,
        topic=body.series_id,
    )


def _named(channel: str | None) -> str | None:
    """A job's channel as a review item keeps it: none for the jobs booked to no channel."""
    return None if channel == UNASSIGNED_CHANNEL else channel


class TaskAnswerer:
    """Answers task bodies with this process's predictors and the script provider chain."""

    def __init__(
        self,
        settings: Settings,
        models: Iterable[BaseKServeModel],
        ledger: CostLedger,
        strategist: Callable[[], ContentStrategist] | None = None,
    ):
        """`strategist` builds the provider chain on first use; None: from `settings`, scoring
        scripts with this process's quality model when it serves one."""
        self.settings = settings
        self.models = {m.name: m for m in models}
        self.ledger = ledger
        self._make_strategist = strategist or self._strategist_from_settings
        self._strategist: ContentStrategist | None = None
        self._strategist_lock = threading.Lock()
        # A pool per task: a script waits on this same server's OpenAI route, which runs its
        # generation in the default pool; sharing one pool, scripts could fill it and wait on
        # themselves, and starve trend and quality.
        self.executors = {
            task: ThreadPoolExecutor(
                TASK_THREADS, thread_name_prefix=f"task-{task}", initializer=one_native_thread
            )
            for task in Task
        }
        self.outstanding: Counter[Task] = Counter()
        """Answers per task submitted to its pool and not finished (waiting or running)."""
        self._outstanding_lock = threading.Lock()

    def submit(
        self, task: Task, call: Callable[[], list[dict[str, Any]]], start_by: float
    ) -> Future[list[dict[str, Any]]]:
        """`call` on `task`'s pool, skipped (`TooLate`) if no thread takes it by `start_by`
        (`time.monotonic()`); `TaskBusy` when the pool has its threads and waiting room full."""
        limit = TASK_THREADS + MAX_WAITING_PER_TASK
        with self._outstanding_lock:
            if self.outstanding[task] >= limit:
                raise TaskBusy(
                    f"{task} has {limit} answers running or waiting, its limit: "
                    f"retry after {BUSY_RETRY_AFTER_SECONDS} s"
                )
            self.outstanding[task] += 1

        def run() -> list[dict[str, Any]]:
            if time.monotonic() > start_by:
                raise TooLate(f"{task} work started after its caller stopped waiting")
            return call()

        try:
            future = self.executors[task].submit(run)
        except RuntimeError:  # shut down
            self._finished(task)
            raise
        future.add_done_callback(lambda _: self._finished(task))
        return future

    def _finished(self, task: Task) -> None:
        with self._outstanding_lock:
            self.outstanding[task] -= 1

    def serves(self, task: Task) -> bool:
        """Scripts come from the chain; trend answers (with its fallback) even without a model;
        quality needs its model."""
        return task is not Task.QUALITY or TASKS[task].model in self.models

    def answer(
        self,
        task: Task,
        bodies: Sequence[pydantic.BaseModel],
        channel: str | None = None,
        *,
        deadline: float | None = None,
        source: Source = Source.TASK,
    ) -> list[dict[str, Any]]:
        """One JSON answer per body. Raises `InvalidInput` when the model refuses a body (the
        request's fault), `TaskUnavailable` when nothing can answer now, and anything else
        when the model failed. `deadline` (`time.monotonic()`) bounds the script chain's
        providers; None: each waits its own timeout. `source` is where a quality review item
        comes from (a route's or a batch job's)."""
        if task is Task.TREND:
            return [a.model_dump() for a in self._trend(bodies)]  # type: ignore[arg-type]
        if task is Task.QUALITY:
            answers = self._quality(bodies, channel, source)  # type: ignore[arg-type]
            return [a.model_dump() for a in answers]
        return [
            self._script(body, channel, deadline).model_dump()  # type: ignore[arg-type]
            for body in bodies
        ]

    def trend_fallback(self, body: TrendBody) -> TrendAnswer:
        """The cached forecast of this request, else the seasonal-naive one."""
        model = self.models.get("trend")
        hit = model.cached_answer(body) if isinstance(model, CachedPredictor) else None
        if hit is not None:
            return _trend_answer(hit, body, fallback=True)
        return naive_forecast(body)

    def _predict(self, name: str, requests: Sequence[pydantic.BaseModel]) -> list[dict[str, Any]]:
        model = self.models.get(name)
        if not isinstance(model, CachedPredictor):
            raise TaskUnavailable(f"the {name} model is not served here")
        if not model.ready:
            raise TaskUnavailable(f"the {name} model is not ready: {model.not_ready_reason()}")
        return model.answer(requests)

    def _trend(self, bodies: Sequence[TrendBody]) -> list[TrendAnswer]:
        model = self.models.get("trend")
        if model is None or not model.ready:  # no champion yet: the simpler model is all there is
            return [naive_forecast(body) for body in bodies]
        try:
            predictions = self._predict("trend", bodies)
        except InvalidInput:
            raise
        except Exception as e:  # the roadmap's rule: fall back to a simpler model
            logger.warning("trend model failed, answering %d with fallbacks: %s", len(bodies), e)
            return [self.trend_fallback(body) for body in bodies]
        return [_trend_answer(p, b, False) for p, b in zip(predictions, bodies, strict=True)]

    def _quality(
        self, bodies: Sequence[QualityRequest], channel: str | None, source: Source
    ) -> list[QualityAnswer]:
        predictions = self._predict("quality", bodies)
        model = self.models["quality"]
        if not isinstance(model, QualityModel):
            raise TaskUnavailable("the quality model here is not the quality gate")
        channel = _named(channel)
        return [
            QualityAnswer(
                score=p["score"],
                decision=p["decision"],
                reasons=p["reasons"],
                model_version=str(p["model_version"]),
                review_item=model.queue_review(b, p, source, channel),
            )
            for b, p in zip(bodies, predictions, strict=True)
        ]

    def _script(
        self, body: ScriptBody, channel: str | None, deadline: float | None
    ) -> ScriptAnswer:
        started = time.perf_counter()
        try:
            script = self.strategist().generate_script(
                body.topic,
                body.persona,
                target_seconds=body.target_seconds,
                deadline=deadline,
                channel=body.channel or _named(channel),
                video_id=body.video_id,
            )
        except AllProvidersFailed as e:
            raise TaskUnavailable(str(e)) from e
        except ClientError as e:
            raise InvalidInput(str(e)) from e
        seconds = time.perf_counter() - started
        cost = script.cost_usd + compute_cost(seconds, self.settings.compute_usd_per_hour)
        self.ledger.record(
            CostEntry(
                channel=body.channel or channel or UNASSIGNED_CHANNEL,
                kind="script",
                usd=cost,
                compute_seconds=seconds,
                provider=script.provider,
                prompt_tokens=0 if script.cached else script.prompt_tokens,
                completion_tokens=0 if script.cached else script.completion_tokens,
                video_id=body.video_id,
            )
        )
        return ScriptAnswer(
            script=script.text,
            provider=script.provider,
            cost_usd=cost,
            cached=script.cached,
            quality_decision=script.quality_decision.value,
            quality_score=script.quality_score,
            quality_reasons=list(script.quality_reasons),
        )

    def strategist(self) -> ContentStrategist:
        with self._strategist_lock:
            if self._strategist is None:
                try:
                    self._strategist = self._make_strategist()
                except UserError as e:  # no usable provider: say so per call, retry later
                    raise TaskUnavailable(str(e)) from e
            return self._strategist

    def _strategist_from_settings(self) -> ContentStrategist:
        scorer = self._score_script if "quality" in self.models else None
        return ContentStrategist.from_settings(self.settings, quality=scorer)

    def _score_script(self, text: str) -> dict[str, Any]:
        # The model's own answer (labels included), not the route's: the strategist queues a
        # review itself, with the script's channel and video.
        try:
            return self._predict("quality", [QualityRequest(text=text[:MAX_TEXT_CHARS])])[0]
        except Exception as e:  # any failure to score: the strategist sends the script to review
            raise QualityUnavailable(f"quality model could not score the script: {e}") from e

    def close(self) -> None:
        for executor in self.executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        if self._strategist is not None:
            self._strategist.close()


# --- routes --------------------------------------------------------------------------------


def _problem(
    status: HTTPStatus, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


async def answer_within_sla(
    answerer: TaskAnswerer, task: Task, body: pydantic.BaseModel
) -> dict[str, Any] | JSONResponse:
    """The answer to one body, or the response that replaces it: fallback, 4xx, 503, 504."""
    sla = TASKS[task].sla_seconds
    wait = sla - TREND_FALLBACK_MARGIN_SECONDS if task is Task.TREND else sla
    call = functools.partial(answerer.answer, task, [body])
    if task is Task.SCRIPT:
        # From now, not from when a thread is free: the wait for one counts against the SLA.
        deadline = time.monotonic() + sla - SCRIPT_ANSWER_MARGIN_SECONDS
        call = functools.partial(call, deadline=deadline)
    try:
        future = answerer.submit(task, call, start_by=time.monotonic() + wait)
    except TaskBusy as e:
        return _problem(
            HTTPStatus.TOO_MANY_REQUESTS, str(e), {"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)}
        )
    work = asyncio.wrap_future(future)
    try:
        (answer,) = await asyncio.wait_for(asyncio.shield(work), wait)
        return answer
    except TimeoutError:
        # Waiting for a thread: it never starts. Running: the thread cannot be stopped; it
        # finishes on its own (a script's chain by its deadline) and its answer is dropped.
        future.cancel()
        work.add_done_callback(_log_late_failure)
        if task is Task.TREND:
            logger.warning("trend answer late after %.1f s: answering the fallback", wait)
            return answerer.trend_fallback(body).model_dump()  # type: ignore[arg-type]
        return _problem(
            HTTPStatus.GATEWAY_TIMEOUT,
            f"{task} did not finish within its {sla:g} s SLA; try again or submit a batch job",
        )
    except InvalidInput as e:
        return _problem(HTTPStatus.UNPROCESSABLE_ENTITY, str(e))
    except TaskUnavailable as e:
        return _problem(HTTPStatus.SERVICE_UNAVAILABLE, str(e))


async def validation_problem(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without each error's `input`: the input may be a value JSON cannot carry
    (NaN, Infinity, which Python's parser accepts), and the field and message name the
    problem."""
    errors = [{k: v for k, v in e.items() if k != "input"} for e in error.errors()]
    return JSONResponse(
        status_code=HTTPStatus.UNPROCESSABLE_ENTITY, content={"detail": jsonable_encoder(errors)}
    )


def _log_late_failure(work: asyncio.Future) -> None:
    if not work.cancelled() and not isinstance(work.exception(), TooLate | None):
        logger.warning("a late task answer failed: %s", work.exception())


def tasks_router(answerer: TaskAnswerer, tasks: Iterable[Task] = tuple(Task)) -> APIRouter:
    """`POST` routes for the `tasks` this process can answer (see `TaskAnswerer.serves`)."""
    router = APIRouter(tags=["tasks"])
    for task in tasks:
        if not answerer.serves(task):
            continue
        spec = TASKS[task]
        router.add_api_route(
            spec.route,
            _endpoint(answerer, task, spec.body),
            methods=["POST"],
            max_body_size=MAX_BODY_BYTES,
            response_model=spec.answer,
            summary=f"{task} within {spec.sla_seconds:g} s",
            responses={
                413: {"description": f"body over {MAX_BODY_BYTES} bytes"},
                429: {"description": "too many answers of this task waiting: retry later"},
                503: {"description": "nothing can answer now (the detail says why)"},
                504: {"description": "not answered within the SLA"},
            },
        )
    return router


def _endpoint(answerer: TaskAnswerer, task: Task, body_type: type[pydantic.BaseModel]):
    async def endpoint(body: pydantic.BaseModel) -> Any:
        return await answer_within_sla(answerer, task, body)

    # FastAPI reads the body's type from the annotation: each route gets its own.
    endpoint.__annotations__ = {"body": body_type, "return": Any}
    endpoint.__name__ = f"{task}_route"
    return endpoint


# --- body size -----------------------------------------------------------------------------

MAX_BODY_BYTES = 1_000_000
"""Largest task body (413 beyond, before parsing): a trend history at its limit (20,000 hours)
is about 400 kB."""
