"""The serving processes:
- `serve`: one KServe ModelServer hosting every model that has a champion, following the
  registry (a promotion or rollback is served within seconds, without a restart), with each
  served model's task route (`/predict/trend`, `/score/quality`). Serving every model (no
  `names`: a laptop, CI) it is the backend API too: `/generate/script`, `/batch/...`, and the
  batch workers as child processes.
- `serve_api`: the backend API alone (the cluster's `contentml-api` Deployment).
- `work`: one batch worker (`contentml batch worker`), answering queued chunks with the models
  loaded in-process.

Both servers check the bearer token, bound each model's requests in flight and drain on
SIGTERM (`serving/admission.py`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import ModelServer
from kserve.errors import ModelNotReady
from kserve.model import BaseKServeModel
from kserve.model_repository import ModelRepository
from kserve.model_server import app
from starlette.types import ASGIApp
from timing_asgi import TimingMiddleware

from contentml import events
from contentml.errors import UserError
from contentml.launch import CLI_MODULE
from contentml.protocol import OPENAI_ROUTE_PREFIX
from contentml.runtime import freeze_heap, one_native_thread
from contentml.settings import Settings
from serving.admission import Admission, AdmissionMiddleware, drain_on_sigterm
from serving.backend.batch.queue import BatchQueue, Heartbeat
from serving.backend.batch.routes import batch_router
from serving.backend.capacity import capacity_router
from serving.backend.channels import channels_router
from serving.backend.console import console_router
from serving.backend.costs import CostLedger, register_cost_metrics
from serving.backend.event_stream import events_router
from serving.backend.review import ReviewExpiry, register_review_metrics, review_router
from serving.backend.tasks import TASKS, Task, TaskAnswerer, tasks_router, validation_problem
from serving.caller.provider_monitor import ProviderMonitor, register_provider_metrics
from serving.model_server.cache import CacheConfig
from serving.model_server.niche import NicheRouter
from serving.model_server.openai_routes import openai_router
from serving.model_server.prediction_log import PredictionLog, open_prediction_log
from serving.model_server.quality import QualityModel
from serving.model_server.revenue import RevenueModel, revenue_router
from serving.model_server.script import ScriptModel
from serving.model_server.trend import TrendModel
from serving.model_server.versions import OffLoopModel, ServingOptions, VersionWatcher
from training.quality.review_store import ReviewStore

PREDICTORS: dict[str, type[OffLoopModel]] = {
    "trend": TrendModel,
    "quality": QualityModel,
    "niche": NicheRouter,
    "script": ScriptModel,
    "revenue": RevenueModel,
}
"""Served model name -> the predictor class that serves it. With `niche`, every registered
`niche-<slug>` model is served too; `script` answers on the OpenAI routes (`/openai/v1/...`);
`revenue` (the RevenueOptimizer's bandits) needs no registered model, and takes rewards on
`/v1/experiments/...`."""

MAX_MODEL_BODY_BYTES = 16 * 2**20
"""Largest body a KServe route (V1, V2) reads; 413 beyond, before parsing. A V1 call's 1,000
instances with two weeks of hourly history each take about 3 MB. Routes with their own limit
(the task routes, batch jobs, rewards) keep it."""

LIMITED_ROUTES: dict[str, str] = {
    **{spec.route: spec.model for spec in TASKS.values()},
    # A batch submission is parsed and stored by the server: it takes a slot too.
    **{f"/batch/{task.value}": spec.model for task, spec in TASKS.items()},
    # The OpenAI routes name their model in the body; only the script model answers there.
    **{
        f"{OPENAI_ROUTE_PREFIX}/v1/{kind}": TASKS[Task.SCRIPT].model
        for kind in ("completions", "chat/completions")
    },
}
"""Routes that name no model in their path -> the model whose limit of requests in flight
they count against (`Settings.max_concurrent_requests`, per route)."""

logger = logging.getLogger(__name__)


def parse_canary(items: list[str]) -> dict[str, int]:
    """`["trend=10", ...]` (the CLI's `--canary`) -> `{"trend": 10}`."""
    canary = {}
    for item in items:
        name, sep, percent = item.partition("=")
        if not sep or not percent.strip().isdigit():
            raise UserError(f"--canary takes MODEL=PERCENT, e.g. trend=10, not {item!r}")
        canary[name.strip()] = int(percent)
    return canary


def load_models(
    settings: Settings,
    names: list[str] | None = None,
    canary: Mapping[str, int] | None = None,
    cache: CacheConfig | None = None,
    prediction_log: PredictionLog | None = None,
) -> list[OffLoopModel]:
    """One predictor per named model, each serving its champion (and, with a canary share,
    the challenger). A model without a champion is returned not ready: it answers 503 naming
    the command that trains it until `VersionWatcher` serves its first champion. `canary`
    maps a model name to the challenger's percent of its requests (`niche` applies to every
    niche model); `cache` is the prediction cache in front of trend, quality and the niche
    models, `prediction_log` where they log what they answered."""
    names = names or list(PREDICTORS)
    canary = dict(canary or {})
    unknown = sorted((set(names) | set(canary)) - set(PREDICTORS))
    if unknown:
        raise ValueError(f"no predictor for {', '.join(unknown)}; known: {', '.join(PREDICTORS)}")
    models = []
    for name in names:
        options = ServingOptions(
            canary_percent=canary.get(name, 0),
            cache=cache or CacheConfig(),
            prediction_log=prediction_log,
        )
        model = PREDICTORS[name](name, settings, options)
        try:
            model.load()
        except Exception as e:  # a broken champion: the others serve, the watcher retries it
            logger.error("%s failed to load; not serving it yet: %s", name, e, exc_info=e)
        models.append(model)
    return models


def kserve_models(models: list[OffLoopModel]) -> list[OffLoopModel]:
    """Every model KServe routes to: the predictors and the niche models behind the router."""
    return [
        served
        for model in models
        for served in [model, *(model.niches.values() if isinstance(model, NicheRouter) else ())]
    ]


PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal a child gets when its parent dies."""

WORKER_NICENESS = 5
"""Batch workers started by `serve` yield the CPU to the server's own requests."""

QUEUE_POLL_SECONDS = 1.0
"""An idle worker looks at the queue at least this often (huey backs off to 10 s otherwise)."""

WORKER_SHUTDOWN_SECONDS = 50.0
"""A stopping worker finishes its chunk this long, within Kubernetes' 60 s grace period."""


class ServedModels(ModelRepository):
    """KServe's model repository, whose `load` (a no-op in KServe) loads again, and registers
    again, a model this server serves after `/v2/repository/models/{name}/unload` took it out
    (KServe's unload marks it not ready)."""

    def __init__(self) -> None:
        super().__init__()
        self.served: dict[str, BaseKServeModel] = {}

    def update(self, model: BaseKServeModel, name: str | None = None) -> None:
        super().update(model, name)
        self.served[name or model.name] = model

    def load(self, name: str) -> bool:
        model = self.served.get(name)
        if model is None:
            return False
        model.load()
        super().update(model, name)
        return model.ready


class BoundModelServer(ModelServer):
    """KServe's ModelServer listening on `host`; KServe's own always listens on every
    interface. gRPC is off: the token check (`serving/admission.py`) guards HTTP only. Without
    `access_log` (`Settings.access_log`) uvicorn writes no line per request."""

    def __init__(self, host: str, access_log: bool = False, **options: Any) -> None:
        super().__init__(**options, enable_grpc=False)
        self.host = host
        self.access_log = access_log

    def setup_event_loop(self) -> None:
        # `start` builds its uvicorn config, then calls this before serving: the one moment
        # the host it hard-codes, and the access log it leaves on, can be changed.
        config = self._rest_server.config
        config.host = self.host
        config.access_log = self.access_log
        config.configure_logging()  # KServe's log_config is None: this applies access_log only
        super().setup_event_loop()


def serve(
    settings: Settings,
    host: str,
    port: int,
    names: list[str] | None = None,
    *,
    canary: Mapping[str, int] | None = None,
    workers: int = 1,
) -> None:
    """Serve V1, V2 (Open Inference Protocol), OpenAI, the task routes, `/v1/channels`, health
    and /metrics on `host`:`port` (`serving.admission.bind_host`) until stopped, reading the
    aliases every `settings.serving_poll_seconds` and swapping to the versions they name.
    Answered instances go to the prediction log (`settings.prediction_log`), written out when
    the server stops.
    Without `names` (every model) it is the backend API too, with `workers` batch workers.

    On SIGTERM it drains (`serving/admission.py`), and only once the last request is answered
    unloads the models, stops the batch workers and the registry's follower, and writes the
    prediction log out."""
    cache = CacheConfig(settings.prediction_cache)
    prediction_log = open_prediction_log(settings)
    # KServe gives the grace period to uvicorn's graceful shutdown, whose end runs KServe's
    # own SIGTERM handler: it unloads the models after the last request.
    server = BoundModelServer(
        host,
        settings.access_log,
        http_port=port,
        registered_models=ServedModels(),
        workers=1,
        grace_period=settings.shutdown_grace_seconds,
        enable_latency_logging=False,
    )
    models = load_models(settings, names, canary, cache, prediction_log)
    exposed = kserve_models(models)
    admission = Admission.from_settings(settings, (m.name for m in exposed), LIMITED_ROUTES)

    def expose(model: OffLoopModel) -> None:
        """A model found after the start (a niche a later AutoML run added) gets its routes
        and its limit, like those found at the start."""
        admission.models = admission.models | {model.name}
        server.register_model(model)

    for model in models:
        if isinstance(model, NicheRouter):
            model.on_new_niche = expose
    finish_app(app, admission, server.registered_models)
    app.max_body_size = MAX_MODEL_BODY_BYTES  # KServe's routes have none; ours set their own
    # KServe creates the app: an included router's lifespan is how one is added to it.
    events.configure(settings)
    hub = events.EventHub(events.followed_buses(settings)).start()
    drain = drain_on_sigterm(admission, settings.shutdown_drain_seconds, hub.close_streams)
    app.include_router(APIRouter(lifespan=drain))
    router = openai_router(models)
    if router is not None:
        # KServe's own OpenAI routes need vLLM (see serving/model_server/openai_routes.py);
        # ours go on the app KServe serves, which it imports by name when it starts.
        app.include_router(router)
    reviews = ReviewStore.from_settings(settings)  # the human review queue, shared
    app.include_router(review_router(reviews))
    register_review_metrics(reviews, settings)
    app.include_router(console_router(settings, reviews))  # /console, for people
    app.include_router(channels_router(settings))  # CrisisManager: anomalies and quarantine
    app.include_router(events_router(hub))
    for model in models:
        if isinstance(model, RevenueModel):
            app.include_router(revenue_router(model))
    is_api = names is None
    ledger = CostLedger.from_settings(settings) if is_api else None
    answerer = TaskAnswerer(settings, models, ledger)
    served = {m.name for m in models}
    # The whole platform answers every task; a predictor pod answers its model's. A model
    # without a champion yet has its routes too: they answer 503 until it has one.
    tasks = [t for t in Task if is_api or TASKS[t].model in served]
    app.include_router(tasks_router(answerer, tasks))
    app.add_exception_handler(RequestValidationError, validation_problem)
    queue = monitor = None
    if ledger is not None:
        queue = BatchQueue(settings, ledger=ledger)
        app.include_router(batch_router(queue))
        register_cost_metrics(ledger)
        monitor = ProviderMonitor.from_settings(settings)  # the script providers' state
        app.include_router(capacity_router(monitor))
        register_provider_metrics(monitor)
    freeze_heap()
    for model in exposed:
        server.register_model(model)  # ready or not: KServe answers 503 for a model not ready
    # Started after the registration above: a niche it finds later is exposed once, by it.
    watcher = VersionWatcher(
        settings, models, settings.serving_poll_seconds, chores=[ReviewExpiry(reviews, settings)]
    ).start()
    try:
        with batch_workers(settings, workers if queue is not None else 0):
            # KServe's start() marks every model it is given ready: only those that are.
            server.start([m for m in exposed if m.ready])
    finally:
        hub.stop()
        watcher.stop()
        reviews.close()
        answerer.close()
        if queue is not None:
            queue.close()
        if monitor is not None:
            monitor.close()
        if prediction_log is not None:
            prediction_log.close()


def finish_app(app: FastAPI, admission: Admission, repository: ServedModels) -> None:
    """Make `AdmissionMiddleware` the outermost middleware of KServe's `app`, take out
    KServe's `TimingMiddleware`, and answer a model that is not ready with why. KServe adds
    its middlewares and exception handlers when the server starts, outside (and over) any
    added before, so these changes are made when the app builds its stack.

    - A refusal must cost only its check, not the other middlewares'. The timing middleware
      calls getrusage twice and logs two lines per request, with the GIL held: about a third
      of the event loop's time at saturation, for figures the Prometheus histograms (KServe's
      and `serving.model_server.versions`') already hold.
    - KServe's 503 for a model not ready says only that; ours says why and, for a model with
      no champion yet, which command trains one. A model this server does not serve is 404.
    - KServe answers 501 for what it does not implement (a model version in the path or
      query, `:explain` without an explainer): here that is a resource not offered, 404."""
    build = app.build_middleware_stack

    async def model_not_ready(request: Request, error: ModelNotReady) -> JSONResponse:
        if error.model_name not in repository.served:
            return JSONResponse(
                status_code=HTTPStatus.NOT_FOUND,
                content={"error": f"no model {error.model_name!r} is served here"},
            )
        model = repository.served[error.model_name]
        reason = model.not_ready_reason() if isinstance(model, OffLoopModel) else "not loaded"
        if request.url.path.endswith("/load"):
            # A load asked of a model that cannot be loaded now (no champion yet): the
            # registry's state is in the way, not the server's health.
            return JSONResponse(
                status_code=HTTPStatus.CONFLICT,
                content={"error": f"model {error.model_name!r} cannot be loaded: {reason}"},
            )
        return JSONResponse(
            status_code=HTTPStatus.SERVICE_UNAVAILABLE,
            content={"error": f"model {error.model_name!r} is not ready: {reason}"},
        )

    async def not_offered(_: Request, error: NotImplementedError) -> JSONResponse:
        return JSONResponse(
            status_code=HTTPStatus.NOT_FOUND,
            content={"error": f"not offered by this server: {error}"},
        )

    def build_middleware_stack() -> ASGIApp:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not TimingMiddleware]
        app.exception_handlers[ModelNotReady] = model_not_ready
        app.exception_handlers[NotImplementedError] = not_offered
        return AdmissionMiddleware(build(), admission)

    app.build_middleware_stack = build_middleware_stack


@contextmanager
def batch_workers(settings: Settings, count: int) -> Iterator[list[subprocess.Popen]]:
    """`count` `contentml batch worker` child processes while the block runs (yielded, for
    callers that watch or kill them: tests, the batch benchmark)."""
    command = [sys.executable, "-m", CLI_MODULE, "batch", "worker"]
    children = [
        subprocess.Popen(
            command,
            env={**os.environ, **settings.to_env()},
            preexec_fn=_as_worker_child,
        )
        for _ in range(count)
    ]
    try:
        yield children
    finally:
        for child in children:
            child.terminate()  # SIGTERM: the worker finishes its chunk, then exits
        for child in children:
            try:
                child.wait(timeout=WORKER_SHUTDOWN_SECONDS + 5)
            except subprocess.TimeoutExpired:
                child.kill()


def _as_worker_child() -> None:
    """In the child before it runs: lower priority, and SIGTERM when the server dies, however
    it dies (Linux's parent-death signal), so no worker outlives its server."""
    os.nice(WORKER_NICENESS)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve_api(settings: Settings, host: str, port: int) -> None:
    """The backend API without models (the cluster's `contentml-api`): `/generate/script`
    through the provider chain, batch jobs, health, the OpenAPI schema and /metrics; it
    drains on SIGTERM like `serve`."""
    from prometheus_client import make_asgi_app

    ledger = CostLedger.from_settings(settings)
    answerer = TaskAnswerer(settings, [], ledger)
    queue = BatchQueue(settings, ledger=ledger)
    register_cost_metrics(ledger)
    reviews = ReviewStore.from_settings(settings)
    register_review_metrics(reviews, settings)
    monitor = ProviderMonitor.from_settings(settings)
    register_provider_metrics(monitor)
    events.configure(settings)
    hub = events.EventHub(events.followed_buses(settings)).start()
    admission = Admission.from_settings(settings, fixed_routes=LIMITED_ROUTES)
    api = FastAPI(
        title="contentml backend API",
        lifespan=drain_on_sigterm(admission, settings.shutdown_drain_seconds, hub.close_streams),
    )
    api.add_middleware(AdmissionMiddleware, admission=admission)
    api.add_exception_handler(RequestValidationError, validation_problem)
    api.include_router(tasks_router(answerer, [Task.SCRIPT]))
    api.include_router(batch_router(queue))
    api.include_router(review_router(reviews))
    api.include_router(capacity_router(monitor))
    api.include_router(events_router(hub))
    api.add_api_route("/v2/health/live", lambda: {"live": True}, methods=["GET"])
    api.add_api_route("/v2/health/ready", lambda: {"ready": True}, methods=["GET"])
    api.mount("/metrics", make_asgi_app())
    freeze_heap()
    try:
        uvicorn.run(
            api,
            host=host,
            port=port,
            timeout_graceful_shutdown=settings.shutdown_grace_seconds,
            access_log=settings.access_log,
        )
    finally:
        reviews.close()
        hub.stop()
        answerer.close()
        queue.close()
        monitor.close()


def work(settings: Settings, threads: int) -> None:
    """One batch worker until SIGTERM (finishes the chunks in hand) or SIGINT: huey's consumer
    with `threads` threads, the trend and quality champions loaded here, following the
    registry like the server."""
    # Without a champion yet, trend items get fallback forecasts and quality items wait.
    models = load_models(settings, ["trend", "quality"], cache=CacheConfig("off"))
    events.configure(settings)  # the batch progress it publishes reaches the servers
    ledger = CostLedger.from_settings(settings)
    answerer = TaskAnswerer(settings, models, ledger)
    queue = BatchQueue(settings, answerer=answerer, ledger=ledger)
    watcher = VersionWatcher(settings, models, settings.serving_poll_seconds).start()
    # OpenMP's limit is per thread: each of huey's worker threads sets it when it starts.
    queue.huey.on_startup("one_native_thread")(one_native_thread)
    heartbeat = Heartbeat(queue)
    heartbeat.start()
    consumer = queue.huey.create_consumer(
        workers=threads,
        periodic=False,
        max_delay=QUEUE_POLL_SECONDS,
        graceful_signal="TERM",
        shutdown_timeout=WORKER_SHUTDOWN_SECONDS,
    )
    queue_kind = settings.batch_queue.partition(":")[0]  # not the URL: it may carry a password
    logger.info("batch worker %s: %d threads on a %s queue", queue.worker, threads, queue_kind)
    try:
        consumer.run()
    finally:
        heartbeat.stop()
        watcher.stop()
        answerer.close()
        queue.close()
        ledger.close()
