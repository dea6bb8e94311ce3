"""Serving follows the registry: every predictor serves immutable loaded versions, swapped by a
watcher when an alias moves, with an optional champion/challenger split, per-version metrics
and a prediction cache. One code path for every predictor; each adds only `load_version`.

- **Hot swap.** A predictor's loaded state for one registered version is an immutable object
  (`Loaded`: the version and whatever the predictor needs to answer). `VersionWatcher` (one
  thread per server) reads every model's aliases in one registry search every
  `settings.serving_poll_seconds`; when one moved, the predictor loads the new version fully
  on that thread, then replaces one reference. A request reads the reference once, so it is
  answered wholly by the version it started with, and no request waits for or fails on a
  load. A model in `settings.pinned_versions` serves that version only (KServe's predictors:
  KServe moves the traffic). A version that fails to load is logged and counted
  (`contentml_model_load_failures_total{model,version}`) and the current one keeps serving;
  it is tried again once the alias has pointed elsewhere. The replaced champion stays in
  memory, so a rollback to it is a swap without a load.
- **A/B.** With `canary_percent` > 0 the `challenger` version answers that share of requests.
  The split is by a hash of the request's instances, not random: a retried or repeated
  request gets the same version (and its cached answer), and the share holds over many
  distinct requests.
- **Metrics.** `contentml_requests_total`, `contentml_request_errors_total` and
  `contentml_request_seconds` by model and version (beside KServe's per-model histograms on
  `/metrics`), `contentml_served_version{model,alias}`, `contentml_cache_lookups_total`.
- **Cache.** `CachedPredictor` answers each instance from the prediction cache
  (`serving/model_server/cache.py`) and sends only the misses to the model.
- **Prediction log.** Every request has an id (`request_id_of`), returned in the response
  (V1: top-level `request_id`; V2: the response `id`); each answered instance is handed to the
  prediction log (`serving/model_server/prediction_log.py`, off the request path) under that
  id and its position in the request, which is what ground truth joins on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import mlflow
import pydantic
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from prometheus_client import Counter, Gauge, Histogram

from contentml import registry
from contentml.errors import UserError
from contentml.registry import Alias
from contentml.runtime import one_native_thread
from contentml.settings import Settings
from serving.model_server.cache import CacheConfig, PredictionCache, canonical_json, make_cache
from serving.model_server.prediction_log import PredictionLog

logger = logging.getLogger(__name__)

REQUESTS = Counter(
    "contentml_requests", "Requests answered, by served version", ["model", "version"]
)
ERRORS = Counter(
    "contentml_request_errors",
    "Requests that failed: `invalid_input` (400) or `failed` (500); version is empty when the "
    "payload failed before a version was chosen",
    ["model", "version", "kind"],
)
LATENCY = Histogram(
    "contentml_request_seconds", "Time to answer a request, by version", ["model", "version"]
)
CACHE_LOOKUPS = Counter(
    "contentml_cache_lookups", "Instances looked up in the cache", ["model", "version", "result"]
)
LOADS = Counter("contentml_model_loads", "Versions loaded", ["model", "version"])
LOAD_FAILURES = Counter(
    "contentml_model_load_failures",
    "Versions an alias pointed at that failed to load (the previous one kept serving)",
    ["model", "version"],
)
SERVED_VERSION = Gauge(
    "contentml_served_version", "Registered version served per alias", ["model", "alias"]
)
CANARY_PERCENT = Gauge(
    "contentml_canary_percent", "Share of requests the challenger answers", ["model"]
)


class Loaded(Protocol):
    """What a predictor loaded for one registered version. Never mutated after loading."""

    @property
    def version(self) -> str: ...


S = TypeVar("S", bound=Loaded)


@dataclass(frozen=True)
class ServingOptions:
    """How one model is served beside loading its champion."""

    canary_percent: int = 0
    """Percent of requests (0-100) the `challenger` version answers; 0 serves the champion
    only."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    """The prediction cache in front of the model (models that sample, like `script`, have
    none)."""

    prediction_log: PredictionLog | None = None
    """Where answered instances are logged (one log per server process); None logs nothing."""

    def __post_init__(self) -> None:
        if not 0 <= self.canary_percent <= 100:
            raise UserError(f"canary percent must be 0-100, not {self.canary_percent}")


@dataclass(frozen=True)
class Serving(Generic[S]):
    """The versions answering now; replaced whole, never changed."""

    champion: S
    challenger: S | None = None


def split_bucket(key: str) -> int:
    """0-99 from a stable hash: the same request always lands in the same bucket."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def load_pyfunc(name: str, version: str) -> mlflow.pyfunc.PyFuncModel:
    """A registered version's pyfunc (the registry URI is set by `registry.connect`), for
    `VersionedModel.load_version`: `VersionedModel._load` has checked that its artifacts lie in
    the registry's own store (a version's source never changes once registered)."""
    return mlflow.pyfunc.load_model(f"models:/{name}/{version}")


PREDICT_THREADS = ThreadPoolExecutor(thread_name_prefix="predict", initializer=one_native_thread)
"""Where `OffLoopModel.predict` answers: requests in parallel, one native thread each."""


class OffLoopModel(Model):
    """KServe calls a plain `predict()` on its event loop (kserve/model.py), where a slow
    prediction holds up every other request: health probes, the admission middleware's 429s,
    the task routes' SLA timers. Our predictors answer in `predict_now` (plain, for callers on
    their own threads: the task routes, batch workers, tests), and `predict` runs it on
    `PREDICT_THREADS`."""

    train_command: ClassVar[str] = ""
    """The command that trains a version of the model: what a 503 before its first champion
    tells the caller to run."""

    def not_ready_reason(self) -> str:
        """Why the model does not answer yet, for the 503 a caller gets meanwhile."""
        return "it is loading"

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(PREDICT_THREADS, self.predict_now, payload, headers)

    def predict_now(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        raise NotImplementedError


class VersionedModel(OffLoopModel, Generic[S]):
    """A KServe predictor serving its model's `champion` (and `challenger` when the canary is
    on), following the aliases through `refresh()`. Subclasses implement `load_version`;
    what every version shares (a Feast store) they load in `load()` before `super().load()`.
    """

    client_errors: tuple[type[Exception], ...] = (InvalidInput,)
    """Exceptions that are the request's fault (HTTP 400), counted as `invalid_input`."""

    def __init__(self, name: str, settings: Settings, options: ServingOptions | None = None):
        super().__init__(name)
        self.settings = settings
        self.options = options or ServingOptions()
        self._serving: Serving[S] | None = None
        self._previous: S | None = None
        self._failed: dict[Alias, str] = {}
        # One model call at a time: requests answer on several threads (`OffLoopModel`), and
        # tokenizers and some models are not thread-safe. Cache hits do not wait.
        self._inferring = threading.Lock()

    def load_version(self, version: str) -> S:
        """Load one registered version completely, ready to answer."""
        raise NotImplementedError

    @property
    def pinned_version(self) -> str | None:
        """The version `settings.pinned_versions` fixes this model at (KServe's predictors)."""
        return self.settings.pinned().get(self.name)

    def load(self, aliases: registry.Aliases | None = None) -> bool:
        """Serve the champion that `aliases` (None: read them) name; without one the model
        waits, not ready (KServe answers 503), and `refresh` serves the first champion once
        there is one. A champion that fails to load fails the start."""
        client = registry.connect(self.settings)
        if aliases is None:
            aliases = registry.read_aliases(client)
        CANARY_PERCENT.labels(self.name).set(self.options.canary_percent)
        champion = self.pinned_version or aliases.version(self.name, Alias.CHAMPION)
        if champion is None:
            logger.warning("not serving %s yet: %s", self.name, self.not_ready_reason())
            return self.ready
        self._start(client, aliases, self._load(client, champion))
        return self.ready

    def not_ready_reason(self) -> str:
        if self._serving is None:
            return f"it has no champion yet: train one with `{self.train_command}`"
        return super().not_ready_reason()

    def _start(
        self, client: registry.RegistryClient, aliases: registry.Aliases, champion: S
    ) -> None:
        self._serving = Serving(champion)
        self.refresh(client, aliases)  # the challenger, when the canary is on
        self._report()
        self.ready = True

    @property
    def serving(self) -> Serving[S]:
        if self._serving is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        return self._serving

    @property
    def version(self) -> str | None:
        """The champion's version."""
        return self._serving.champion.version if self._serving else None

    # --- following the registry --------------------------------------------------------

    def refresh(
        self, client: registry.RegistryClient, aliases: registry.Aliases | None = None
    ) -> bool:
        """Serve the versions the aliases point at now (`aliases`, the watcher's read of this
        poll; None: read them); True when that changed anything."""
        if aliases is None:
            aliases = registry.read_aliases(client)
        if self._serving is None:  # waiting for a first champion
            champion = self._follow(client, aliases, Alias.CHAMPION, None)
            if champion is None:
                return False
            self._start(client, aliases, champion)
            logger.info("%s now serves its first champion v%s", self.name, champion.version)
            return True
        if self.pinned_version is not None:
            return False  # KServe routes between pinned predictors, not this server
        serving = self.serving
        champion = self._follow(client, aliases, Alias.CHAMPION, serving.champion)
        challenger = None
        if self.options.canary_percent:
            challenger = self._follow(client, aliases, Alias.CHALLENGER, serving.challenger)
        if champion is serving.champion and challenger is serving.challenger:
            return False
        if champion is not serving.champion:
            self._previous = serving.champion
        self._serving = Serving(champion, challenger)  # the swap: one reference
        self._report()
        logger.info(
            "%s now serves champion v%s%s",
            self.name,
            champion.version,
            f", challenger v{challenger.version}" if challenger else "",
        )
        return True

    def _follow(
        self,
        client: registry.RegistryClient,
        aliases: registry.Aliases,
        alias: Alias,
        current: S | None,
    ) -> S | None:
        version = aliases.version(self.name, alias)
        if version is None:
            # An unset champion keeps the last one serving; an unset challenger ends the split.
            return current if alias is Alias.CHAMPION else None
        if current is not None and current.version == version:
            self._failed.pop(alias, None)
            return current
        if self._failed.get(alias) == version:
            return current
        try:
            state = self._load(client, version)
        except Exception as e:  # any failure to load must leave the current version serving
            self._failed[alias] = version
            LOAD_FAILURES.labels(self.name, version).inc()
            logger.error(
                "%s v%s (%s) failed to load; still serving v%s: %s",
                self.name,
                version,
                alias.value,
                current.version if current else "none",
                e,
                exc_info=e,
            )
            return current
        self._failed.pop(alias, None)
        return state

    def _load(self, client: registry.RegistryClient, version: str) -> S:
        serving = self._serving
        kept = (serving.champion, serving.challenger, self._previous) if serving else ()
        for state in kept:
            if state is not None and state.version == version:
                return state
        # Whatever the version's source says, only the registry's own artifacts are loaded.
        registry.stored_artifact_uri(client, self.name, version)
        started = time.monotonic()
        state = self.load_version(version)
        LOADS.labels(self.name, version).inc()
        logger.info("%s v%s loaded in %.1f s", self.name, version, time.monotonic() - started)
        return state

    def _report(self) -> None:
        serving = self.serving
        SERVED_VERSION.labels(self.name, Alias.CHAMPION.value).set(int(serving.champion.version))
        challenger = int(serving.challenger.version) if serving.challenger else 0
        SERVED_VERSION.labels(self.name, Alias.CHALLENGER.value).set(challenger)

    # --- answering ---------------------------------------------------------------------

    def pick(self, key: Callable[[], str]) -> S:
        """The version that answers the request whose stable key is `key()`, computed only
        when a challenger splits the traffic (a long history's key costs a JSON dump)."""
        serving = self.serving
        if serving.challenger is None:
            return serving.champion
        if split_bucket(key()) < self.options.canary_percent:
            return serving.challenger
        return serving.champion

    @contextlib.contextmanager
    def observe(self, version: str) -> Iterator[None]:
        """Count and time one request answered by `version`."""
        started = time.perf_counter()
        try:
            yield
        except self.client_errors:
            ERRORS.labels(self.name, version, "invalid_input").inc()
            raise
        except Exception:
            ERRORS.labels(self.name, version, "failed").inc()
            raise
        finally:
            REQUESTS.labels(self.name, version).inc()
            LATENCY.labels(self.name, version).observe(time.perf_counter() - started)


Request = TypeVar("Request", bound=pydantic.BaseModel)


class CachedPredictor(VersionedModel[S], Generic[S, Request]):
    """A predictor that answers instance by instance: parse the payload, build each
    instance's model input, answer misses of the prediction cache with the version the split
    picks, and word the response. Subclasses implement the four steps."""

    def load(self, aliases: registry.Aliases | None = None) -> bool:
        self.cache: PredictionCache | None = make_cache(self.options.cache, self.name)
        return super().load(aliases)

    def parse(self, payload: Any) -> list[Request]:
        """The validated instances of a V1 body or V2 `InferRequest` (`InvalidInput` if bad)."""
        raise NotImplementedError

    def model_inputs(self, requests: list[Request]) -> list[dict[str, Any]]:
        """Everything the model reads per instance, as JSON-ready dicts: the cache key."""
        return [r.model_dump(mode="json", exclude_none=True) for r in requests]

    def infer(self, state: S, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One JSON-ready answer per input, from one loaded version."""
        raise NotImplementedError

    def respond(self, payload: Any, answers: list[dict[str, Any]]) -> dict | InferResponse:
        """The response body: V1 predictions as answered; V2 outputs are the predictor's
        `v2_outputs`."""
        if isinstance(payload, InferRequest):
            return InferResponse(
                response_id=payload.id or "",
                model_name=self.name,
                model_version=answers[0]["model_version"],
                infer_outputs=self.v2_outputs(answers),
            )
        return {"predictions": answers}

    def v2_outputs(self, answers: list[dict[str, Any]]) -> list[InferOutput]:
        """The answers as Open Inference Protocol outputs; a V1-only predictor refuses."""
        raise InvalidInput(f"{self.name} answers V1 requests only (`:predict`)")

    def predict_now(
        self, payload: dict | InferRequest, headers: dict[str, str] | None = None
    ) -> dict | InferResponse:
        request_id = request_id_of(payload, headers)
        try:
            requests = self.parse(payload)
        except InvalidInput:
            ERRORS.labels(self.name, "", "invalid_input").inc()
            raise
        answers = self.answer(requests, request_id)
        self.answered(payload, requests, answers)
        return with_request_id(self.respond(payload, answers), request_id)

    def answered(
        self, payload: Any, requests: list[Request], answers: list[dict[str, Any]]
    ) -> None:
        """What a predictor does with a V1 or V2 call's answers besides returning them (the
        quality gate queues reviews); other callers of `answer` (the task routes, batch jobs)
        do their own."""

    def answer(
        self,
        requests: Sequence[Request],
        request_id: str | None = None,
        indices: Sequence[int] | None = None,
    ) -> list[dict[str, Any]]:
        """The answer to each validated request, with the `model_version` the split picked for
        them, logged under `request_id` (None: a new one); `indices` are the requests'
        positions in the call when they are part of it (see `log`)."""
        started = time.perf_counter()
        state = self.pick(lambda: request_key(requests))
        inputs = self.model_inputs(list(requests))
        answers = self.answer_inputs(state, inputs)
        self.log(
            request_id or str(uuid.uuid4()),
            state.version,
            inputs,
            answers,
            time.perf_counter() - started,
            indices,
        )
        return [{**a, "model_version": state.version} for a in answers]

    def log(
        self,
        request_id: str,
        version: str,
        inputs: Sequence[dict[str, Any]],
        answers: Sequence[dict[str, Any]],
        latency_s: float,
        indices: Sequence[int] | None = None,
    ) -> None:
        """Hand answered instances to the prediction log (enqueued only; see `PredictionLog`);
        `indices` are their positions in the request when not 0..n-1."""
        if self.options.prediction_log is not None:
            self.options.prediction_log.record(
                self.name, version, request_id, inputs, answers, latency_s, indices
            )

    def cached_answer(self, request: Request) -> dict[str, Any] | None:
        """The champion's cached answer to one request, with its `model_version`; None when
        there is none (no cache, no champion, not asked before). The fallback of a late one."""
        if self.cache is None or not self.ready:
            return None
        version = self.serving.champion.version
        (inputs,) = self.model_inputs([request])
        (hit,) = self.cache.get_many(version, [inputs])
        return None if hit is None else {**hit, "model_version": version}

    def answer_inputs(self, state: S, inputs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers of `state`'s version to model inputs, from the cache where it has them."""
        with self.observe(state.version):
            if self.cache is None:
                with self._inferring:
                    return self.infer(state, list(inputs))
            found = self.cache.get_many(state.version, inputs)
            missing = [i for i, answer in enumerate(found) if answer is None]
            hits = len(found) - len(missing)
            if hits:
                CACHE_LOOKUPS.labels(self.name, state.version, "hit").inc(hits)
            if missing:
                CACHE_LOOKUPS.labels(self.name, state.version, "miss").inc(len(missing))
                with self._inferring:
                    computed = self.infer(state, [inputs[i] for i in missing])
                for i, answer in zip(missing, computed, strict=True):
                    found[i] = answer
                self.cache.put_many(state.version, [(inputs[i], found[i]) for i in missing])
            return found


REQUEST_ID_HEADER = "x-request-id"
"""Set by the cluster's ingress (Istio, Knative) and by callers that want to send ground truth
back later; KServe hands the headers over lower-cased."""


def request_id_of(payload: Any, headers: dict[str, str] | None) -> str:
    """A request's id: a V2 request's own `id`, else the `x-request-id` header, else a new
    uuid4."""
    if isinstance(payload, InferRequest) and payload.id:
        return str(payload.id)
    given = (headers or {}).get(REQUEST_ID_HEADER)
    return given if given else str(uuid.uuid4())


def with_request_id(response: dict | InferResponse, request_id: str) -> dict | InferResponse:
    """The response carrying its request id: V1 a top-level `request_id`, V2 its `id`."""
    if isinstance(response, InferResponse):
        response.id = request_id
        return response
    return {**response, "request_id": request_id}


def request_key(requests: Sequence[pydantic.BaseModel]) -> str:
    """The stable key a request is split by: its instances as sent (before any features are
    joined in), the same for its V1 and V2 spellings."""
    return canonical_json([r.model_dump(mode="json", exclude_none=True) for r in requests])


@runtime_checkable
class Follower(Protocol):
    """A predictor that follows the registry: a `VersionedModel`, or the niche router, which
    also serves the niche models registered after it started."""

    name: str

    def refresh(
        self, client: registry.RegistryClient, aliases: registry.Aliases | None = None
    ) -> bool: ...


class VersionWatcher:
    """One thread that keeps every served model on the versions its aliases point at, and
    serves a model's first champion once it has one; the server's periodic loop, which also
    runs its other chores (the review queue's expiry check) on each tick."""

    def __init__(
        self,
        settings: Settings,
        models: Sequence[Any],
        poll_seconds: float,
        chores: Sequence[Callable[[], None]] = (),
    ):
        """`models`: the served predictors; those that are no `Follower` (the revenue bandit,
        which keeps no version in the registry) are left alone. `chores`: called after the
        models each tick; one that fails is logged and called again next tick."""
        if not poll_seconds > 0:
            raise UserError(f"poll_seconds must be positive, not {poll_seconds}")
        self.settings = settings
        self.models = [model for model in models if isinstance(model, Follower)]
        self.poll_seconds = poll_seconds
        self.chores = tuple(chores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="version-watcher", daemon=True)

    def start(self) -> VersionWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def poll_once(self, client: registry.RegistryClient) -> None:
        if self.models:
            try:
                aliases = registry.read_aliases(client)
            except Exception as e:  # the registry unreachable: keep serving, try again
                logger.warning("reading the registry's aliases failed: %s", e)
            else:
                for model in self.models:
                    try:
                        model.refresh(client, aliases)
                    except Exception as e:  # a niche's store unreachable: the others follow
                        logger.warning("following the aliases of %s failed: %s", model.name, e)
        for chore in self.chores:
            try:
                chore()
            except Exception as e:  # a database hiccup: the next tick tries again
                logger.warning("periodic chore %r failed: %s", chore, e)

    def _run(self) -> None:
        client = registry.connect(self.settings)
        while not self._stop.wait(self.poll_seconds):
            self.poll_once(client)
