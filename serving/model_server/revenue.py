"""RevenueOptimizer on the model server: `revenue` picks an arm of an experiment (a title,
thumbnail or hook variant), and `/v1/experiments/{name}/rewards` takes back what it earned.

    POST /v1/models/revenue:predict   {"instances": [{"experiment": "E", "arms": ["a", "b"]}]}
        -> {"predictions": [{"arm": "b", "probabilities": {"a": 0.3, "b": 0.7}}]}
        (optional per instance: "metric": ctr | watch_time | revenue | rpm, "policy":
        thompson | epsilon_greedy | even; an experiment is created on first use)
    POST /v1/experiments/{name}/rewards   {"arm": "b", "reward": 1.0} or a list of them
    GET  /v1/experiments/{name}           the A/B report (JSON); `.../report.html` as a page
    GET  /v1/experiments                  every experiment

Every choice and reward goes to the shared store (`Settings.revenue_store`) before the answer,
so replicas agree and a restart loses nothing. A choice reads its experiment and posterior from
memory (`serving/model_server/refresh.py`): written through by this server's impressions and
rewards, read again from the store every `Settings.serving_poll_seconds` for other replicas'.
A bad instance or reward is refused (400) before anything of its request is stored; an
experiment name in a path that `contentml.names` refuses (`..`, a slash, a percent-escape,
over-long) is refused by `serving.admission` before any route runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse
from kserve.errors import InvalidInput
from starlette.concurrency import run_in_threadpool

from contentml import names
from contentml.settings import Settings
from serving.model_server.refresh import HeldLookups, Refresher
from serving.model_server.versions import OffLoopModel
from training.revenue.experiment import Metric, Policy
from training.revenue.policies import choose
from training.revenue.report import experiment_report, report_html
from training.revenue.store import (
    Experiment,
    ExperimentError,
    RewardStore,
    Standing,
    UnknownExperiment,
    check_arms,
    check_name,
    matching,
)

MAX_INSTANCES = 100
MAX_REWARDS = 10_000
MAX_BODY_BYTES = 2_000_000
INSTANCE_KEYS = {"experiment", "arms", "metric", "policy"}


@dataclass(frozen=True)
class ArmRequest:
    """A checked instance: choose an arm of `experiment`."""

    experiment: str
    arms: list[str]
    metric: Metric | None
    policy: Policy | None
    found: Experiment | None
    """The experiment as stored when the request was checked; None: created on first use."""


def _enum(kind: type, value: Any, what: str):
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise InvalidInput(
            f"{what} must be one of {', '.join(k.value for k in kind)}, not {value!r}"
        ) from None


class RevenueModel(OffLoopModel):
    """Chooses arms by each experiment's policy over the rewards stored so far."""

    def __init__(self, name: str, settings: Settings, options: Any = None):
        super().__init__(name)
        self.settings = settings
        self.store: RewardStore | None = None
        self.refresher: Refresher | None = None

    def load(self) -> bool:
        self.store = RewardStore(self.settings.revenue_store)
        self.standings: HeldLookups[str, Standing | None] = HeldLookups(self.store.standings)
        self._stop_refresher()  # a load after an unload: the previous refresher ends
        self.refresher = Refresher(
            f"{self.name}-standings", self.standings.refresh, self.settings.serving_poll_seconds
        ).start()
        self.rng = np.random.default_rng()
        self.ready = True
        return self.ready

    def stop(self) -> None:
        self._stop_refresher()
        super().stop()

    def _stop_refresher(self) -> None:
        if self.refresher is not None:
            self.refresher.stop()
            self.refresher = None

    def standing(self, experiment: str) -> Standing | None:
        """The experiment and its arms' totals as this server holds them (None: unknown)."""
        return self.standings.get_many([experiment])[experiment]

    def add_rewards(self, experiment: str, outcomes: list[tuple[Any, Any]]) -> int:
        """Store rewards (all or none, `RewardStore.add_rewards`), then hold the experiment's
        new totals: a choice here sees them at once."""
        stored = self.store.add_rewards(experiment, outcomes)
        fresh = self.store.standings([experiment])[experiment]
        self.standings.update(experiment, lambda _: fresh)
        return stored

    def parse(self, payload: Any) -> list[ArmRequest]:
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not 1 <= len(instances) <= MAX_INSTANCES:
            raise InvalidInput(
                f'expected {{"instances": [...]}} with 1 to {MAX_INSTANCES} choices '
                f'(V1 protocol), each {{"experiment": "E", "arms": ["a", "b"]}}'
            )
        requests = []
        first_named: dict[str, int] = {}
        for index, instance in enumerate(instances):
            if not isinstance(instance, dict) or not {"experiment", "arms"} <= set(instance):
                raise InvalidInput(f"instance {index}: needs 'experiment' and 'arms'")
            unknown = set(instance) - INSTANCE_KEYS
            if unknown:
                raise InvalidInput(f"instance {index}: unknown keys {sorted(unknown)}")
            metric = _enum(Metric, instance.get("metric"), f"instance {index}: metric")
            policy = _enum(Policy, instance.get("policy"), f"instance {index}: policy")
            try:
                names.revenue_experiment_name(instance["experiment"])
            except names.NameRefused as e:
                raise InvalidInput(f"instance {index}: {e}") from e
            try:
                # What `RewardStore.check_request` checks, against the experiment held here.
                check_name("experiment", instance["experiment"])
                arms = check_arms(instance["arms"])
                held = self.standing(instance["experiment"])
                found = None if held is None else matching(held.experiment, arms, metric, policy)
            except ExperimentError as e:
                raise InvalidInput(f"instance {index}: {e}") from e
            name = instance["experiment"]
            if name in first_named:
                # Both new here, the check above saw neither: they must agree.
                first = requests[first_named[name]]
                if (
                    list(instance["arms"]) != first.arms
                    or None not in (metric, first.metric)
                    and metric != first.metric
                    or None not in (policy, first.policy)
                    and policy != first.policy
                ):
                    raise InvalidInput(
                        f"instance {index}: experiment {name!r} differs from instance "
                        f"{first_named[name]}'s (arms, metric or policy) in the same request"
                    )
            first_named.setdefault(name, index)
            requests.append(ArmRequest(name, list(instance["arms"]), metric, policy, found))
        return requests

    def predict_now(self, payload: Any, headers: dict[str, str] | None = None) -> dict:
        # Every instance is checked before any is answered: a bad one stores nothing.
        return {"predictions": self.answer(self.parse(payload))}

    def answer(self, requests: list[ArmRequest]) -> list[dict[str, Any]]:
        """The arm chosen for each checked request, each impression stored."""
        predictions = []
        for request in requests:
            standing = self.standing(request.experiment) if request.found else None
            if standing is None:  # new when checked (or evicted since): created here
                try:
                    self.store.ensure(
                        request.experiment, request.arms, request.metric, request.policy
                    )
                except ExperimentError as e:  # another replica created it otherwise meanwhile
                    raise InvalidInput(str(e)) from e
                standing = self.store.standings([request.experiment])[request.experiment]
                self.standings.update(request.experiment, lambda _, s=standing: s)
            experiment = standing.experiment
            choice = choose(list(standing.stats), experiment.kind, experiment.policy, self.rng)
            self.store.record_impression(request.experiment, choice.arm)
            self.standings.update(
                request.experiment, lambda held, arm=choice.arm: held.with_impression(arm)
            )
            predictions.append({"arm": choice.arm, "probabilities": choice.probabilities})
        return predictions


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _outcomes(body: Any) -> list[tuple[Any, Any]]:
    items = body if isinstance(body, list) else [body]
    if not 1 <= len(items) <= MAX_REWARDS:
        raise ExperimentError(f"send 1 to {MAX_REWARDS} rewards, not {len(items)}")
    outcomes = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"arm", "reward"}:
            raise ExperimentError(f'reward {index}: expected {{"arm": "...", "reward": number}}')
        outcomes.append((item["arm"], item["reward"]))
    return outcomes


def revenue_router(model: RevenueModel) -> APIRouter:
    """The experiments' routes over the model's store."""

    async def add_rewards(experiment: str, raw: Request) -> JSONResponse:
        body = await raw.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"body over {MAX_BODY_BYTES} bytes: send rewards in batches")
        try:
            outcomes = _outcomes(json.loads(body))
            # The store is SQL: off the event loop, like the other routes' (plain `def`s).
            stored = await run_in_threadpool(model.add_rewards, experiment, outcomes)
        except UnknownExperiment as e:
            return _error(404, str(e))
        except ExperimentError as e:
            return _error(400, str(e))
        except ValueError as e:  # not JSON
            return _error(400, f"body is not JSON: {e}")
        return JSONResponse({"experiment": experiment, "stored": stored})

    def get_report(experiment: str) -> JSONResponse:
        try:
            return JSONResponse(experiment_report(model.store, experiment))
        except UnknownExperiment as e:
            return _error(404, str(e))

    def get_report_html(experiment: str):
        try:
            found = model.store.experiment(experiment)
        except UnknownExperiment as e:
            return _error(404, str(e))
        page = report_html(model.store.history(experiment), found.metric, title=experiment)
        return HTMLResponse(page)

    def listing() -> JSONResponse:
        return JSONResponse({"experiments": [e.to_dict() for e in model.store.all()]})

    router = APIRouter(prefix="/v1/experiments", tags=["RevenueOptimizer"])
    router.add_api_route("", listing, methods=["GET"])
    # `:path` as in `serving.admission.NAMED_ROUTES`, which checks the names; the longer routes
    # first, since `/{experiment:path}` would match them too.
    router.add_api_route("/{experiment:path}/report.html", get_report_html, methods=["GET"])
    router.add_api_route("/{experiment:path}/rewards", add_rewards, methods=["POST"])
    router.add_api_route("/{experiment:path}", get_report, methods=["GET"])
    return router
