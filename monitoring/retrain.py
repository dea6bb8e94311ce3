"""Retraining trigger: when a window's drift share is more than 10 % or the model's performance
dropped by more than 5 %, launch the model family's training pipeline (kfp.local locally, the
KFP API in the cluster). The pipeline ends in its normal promotion gate, so the new version
becomes champion only when it beats the current one.

Each trigger is recorded as an MLflow run in the `contentml-monitoring` experiment (visible in
the MLflow UI, durable on every backend), tagged `contentml.trigger.model` and
`contentml.trigger.window`. A window fires at most once per model: `maybe_retrain` returns the
window's existing record instead of launching again. A trigger whose launch failed is recorded
(`outcome=failed`) and does not block a retry; one whose monitor died mid-launch stays
`launching` and blocks its window until someone sets its `contentml.trigger.outcome` tag to
`failed` in the MLflow UI.

Two monitors checking the same window at once: the look-up and the claim (creating the run)
happen under `contentml.registry.alias_lock` for a per-model name, the lock alias changes use:

- `postgresql://`: a PostgreSQL advisory lock: exactly one launch, from any number of hosts;
- `sqlite://`: an `flock` beside the database: the same, for the processes of one host;
- `http(s)://` (a tracking server), where MLflow's API offers no lock: every monitor writes its
  claim, waits `SETTLE_SECONDS` and reads the window's claims again; the earliest claim (start
  time, then run id) launches and the others delete theirs and return its record. Exact when a
  claim is written, and hosts' clocks agree, within `SETTLE_SECONDS`. The scheduled monitoring
  run also has KFP's `max_concurrency=1` (`schedule_monitoring`).

The lock is held only for the look-up and the claim, never during the launch: a local pipeline
run takes minutes and its own promotion gate takes the same SQLite lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Metric, Run, RunStatus
from mlflow.tracking import MlflowClient

from contentml import events, registry
from contentml.errors import UserError
from contentml.settings import Settings
from monitoring import performance
from monitoring.rules import DRIFTED_FEATURE_SHARE, PERFORMANCE_DROP

MONITORING_EXPERIMENT = "contentml-monitoring"
"""The MLflow experiment holding the trigger records."""

TAG = "contentml.trigger."
"""Prefix of the trigger records' tags."""

SETTLE_SECONDS = 2.0
"""Without a lock (an `http(s)://` tracking server): how long a claim waits before reading the
window's claims again; longer than a claim's write and the hosts' clock difference."""

EXCLUSIVE_SCHEMES = frozenset({"sqlite", "postgresql"})
"""Tracking-URI schemes whose `registry.alias_lock` excludes concurrent holders."""

RESULT_CHARS = 4000
"""A local run's output kept in the record (MLflow tag values are limited)."""


class TriggerError(UserError):
    """A trigger request that cannot be carried out as given (model, window, values)."""


class LaunchFailed(RuntimeError):
    """The training pipeline could not be launched; the record says `failed`."""


class Family(StrEnum):
    """Model families, named as their registered models are (`niche-music` is `niche`)."""

    TREND = "trend"
    QUALITY = "quality"
    NICHE = "niche"
    SCRIPT = "script"


class Outcome(StrEnum):
    LAUNCHING = "launching"  # claimed; the launch is under way
    LAUNCHED = "launched"  # KFP run submitted, or the local run finished
    FAILED = "failed"  # the launch raised; a later call for the window retries


def _model_name(model: str) -> dict[str, Any]:
    return {"model_name": model}


def _niche(model: str) -> dict[str, Any]:
    # `niche-global` is every niche's warm start: retrain them all.
    slug = model.removeprefix("niche-")
    return {"niches": "" if slug in ("", "global", model) else slug}


def _recipe_default(model: str) -> dict[str, Any]:
    return {}  # the pipeline's default recipe


@dataclass(frozen=True)
class Retraining:
    pipeline: str
    """The training pipeline's name (its package: `pipelines/compiled/<name>.yaml`)."""
    arguments: Callable[[str], dict[str, Any]]
    """Registered model name -> the pipeline's arguments."""


RETRAINING: dict[Family, Retraining] = {
    Family.TREND: Retraining("training", _model_name),
    Family.QUALITY: Retraining("quality-training", _model_name),
    Family.NICHE: Retraining("niche-automl", _niche),
    Family.SCRIPT: Retraining("script-finetune", _recipe_default),
}
"""Model family -> the pipeline that retrains it."""


def family(model: str) -> Family:
    """The family of a registered model: its name, or the part before the first `-`."""
    for name in (model, model.split("-", 1)[0]):
        if name in {f.value for f in Family}:
            return Family(name)
    known = ", ".join(f"{f.value}, {f.value}-*" for f in Family)
    raise TriggerError(f"no training pipeline known for model {model!r}; known: {known}")


def retraining(model: str) -> tuple[str, dict[str, Any]]:
    """(pipeline name, arguments) that retrain `model`."""
    plan = RETRAINING[family(model)]
    return plan.pipeline, plan.arguments(model)


@dataclass(frozen=True)
class TriggerConfig:
    drift_share: float = DRIFTED_FEATURE_SHARE
    """Retrain when the share of drifted features is MORE than this (the drift check's rule)."""

    performance_drop: float = PERFORMANCE_DROP
    """Retrain when the model's metric is worse than at registration by MORE than this
    (relative: 0.05 is 5 % worse)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.drift_share < 1.0:
            raise TriggerError(f"drift_share must be in [0, 1), not {self.drift_share}")
        if not (math.isfinite(self.performance_drop) and self.performance_drop >= 0.0):
            raise TriggerError(f"performance_drop must be >= 0, not {self.performance_drop}")


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reasons: tuple[str, ...]
    """Why, one line per crossed threshold; empty when `retrain` is False."""


def decide(
    drift_share: float, performance_drop: float | None, config: TriggerConfig | None = None
) -> Decision:
    """Retrain when `drift_share` > the config's share or `performance_drop` (None: not
    measured) > the config's drop."""
    config = config or TriggerConfig()
    if not (math.isfinite(drift_share) and 0.0 <= drift_share <= 1.0):
        raise TriggerError(f"drift share must be in [0, 1], not {drift_share}")
    if performance_drop is not None and math.isnan(performance_drop):
        # +inf is a real drop: `performance_drop` of any error against a registered 0.
        raise TriggerError(f"performance drop must be a number, not {performance_drop}")
    reasons = []
    if drift_share > config.drift_share:
        reasons.append(f"drift share {drift_share:.1%} > {config.drift_share:.0%}")
    if performance_drop is not None and performance_drop > config.performance_drop:
        reasons.append(f"performance drop {performance_drop:.1%} > {config.performance_drop:.0%}")
    return Decision(bool(reasons), tuple(reasons))


@dataclass(frozen=True)
class TriggerRecord:
    model: str
    window_id: str
    reasons: tuple[str, ...]
    drift_share: float
    performance_drop: float | None
    """None when not measured."""
    pipeline: str
    arguments: dict[str, Any]
    outcome: Outcome
    pipeline_run: str
    """The KFP run id (cluster), or the local run's output as JSON; empty while launching."""
    time: float
    """When the trigger was claimed (seconds since the epoch)."""
    record_id: str
    """The MLflow run holding the record."""
    drift_run_id: str = ""
    """The drift check's MLflow run, when given."""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reasons": list(self.reasons)}


Launch = Callable[[Settings, str, dict[str, Any]], str]
"""(settings, pipeline name, arguments) -> the launched run's reference (`pipeline_run`); the
project's is `contentml.launch.launch_pipeline`, which its callers pass in."""


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+\-]{0,199}")
"""Model names and window ids: they go into MLflow search filters."""


def check_name(what: str, value: str) -> None:
    if not _SAFE.fullmatch(value):
        raise TriggerError(
            f"{what} {value!r}: use letters, digits and . _ : + - (at most 200, not first)"
        )


def window_of(path: Path) -> str:
    """A window id from a window file's content (`sha256:<16 hex>`): checking the same data
    again is the same window; new data is a new one."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    monitoring = dataclasses.replace(settings, mlflow_experiment=MONITORING_EXPERIMENT)
    return registry.experiment_id(client, monitoring)


def _record(run: Run) -> TriggerRecord:
    tags = run.data.tags
    return TriggerRecord(
        model=tags[TAG + "model"],
        window_id=tags[TAG + "window"],
        reasons=tuple(json.loads(tags[TAG + "reasons"])),
        drift_share=json.loads(tags[TAG + "drift_share"]),
        performance_drop=json.loads(tags[TAG + "performance_drop"]),
        pipeline=tags[TAG + "pipeline"],
        arguments=json.loads(tags[TAG + "arguments"]),
        outcome=Outcome(tags[TAG + "outcome"]),
        pipeline_run=tags.get(TAG + "pipeline_run", ""),
        time=run.info.start_time / 1000,
        record_id=run.info.run_id,
        drift_run_id=tags.get(TAG + "drift_run", ""),
    )


def _claims(client: MlflowClient, experiment: str, model: str, window_id: str) -> list[Run]:
    """The window's claims that stand (launching or launched), earliest first."""
    runs = client.search_runs(
        [experiment],
        filter_string=(
            f"tags.`{TAG}model` = '{model}' AND tags.`{TAG}window` = '{window_id}' "
            f"AND tags.`{TAG}outcome` != '{Outcome.FAILED.value}'"
        ),
    )
    return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))


def trigger_records(settings: Settings, model: str | None = None) -> list[TriggerRecord]:
    """Every trigger recorded (for `model`, or all), oldest first."""
    client = registry.connect(settings)
    experiment = client.get_experiment_by_name(MONITORING_EXPERIMENT)
    if experiment is None:
        return []
    if model is not None:
        check_name("model", model)
    filter_string = "tags.`contentml.kind` = 'retrain-trigger'"
    if model is not None:
        filter_string += f" AND tags.`{TAG}model` = '{model}'"
    runs = client.search_runs([experiment.experiment_id], filter_string=filter_string)
    return [_record(run) for run in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]


def maybe_retrain(
    settings: Settings,
    model: str,
    window_id: str,
    drift_share: float,
    performance_drop: float | None = None,
    *,
    launch: Launch,
    config: TriggerConfig | None = None,
    drift_run_id: str = "",
) -> TriggerRecord | None:
    """Launch `model`'s training pipeline when `decide` says so, at most once per
    (model, window_id); returns the window's trigger record (the existing one when the window
    already fired), or None when no threshold is crossed (nothing is recorded: the drift
    check's own run records the check)."""
    check_name("model", model)
    check_name("window id", window_id)
    decision = decide(drift_share, performance_drop, config)
    if not decision.retrain:
        return None
    pipeline, arguments = retraining(model)

    client = registry.connect(settings)
    experiment = _experiment_id(client, settings)
    with registry.alias_lock(client, f"{TAG}{model}"):
        claims = _claims(client, experiment, model, window_id)
        if claims:
            return _record(claims[0])
        run = client.create_run(
            experiment,
            run_name=f"retrain-{model}-{window_id}",
            tags={
                "contentml.kind": "retrain-trigger",
                TAG + "model": model,
                TAG + "window": window_id,
                TAG + "reasons": json.dumps(list(decision.reasons)),
                TAG + "pipeline": pipeline,
                TAG + "arguments": json.dumps(arguments, sort_keys=True),
                TAG + "outcome": Outcome.LAUNCHING.value,
                TAG + "drift_run": drift_run_id,
                # Tags (exact, read back by `_record`) and metrics (charts in the UI).
                TAG + "drift_share": json.dumps(drift_share),
                TAG + "performance_drop": json.dumps(performance_drop),
            },
        )
    claim = run.info.run_id
    measured = {"drift_share": drift_share, "performance_drop": performance_drop}
    now = int(time.time() * 1000)
    client.log_batch(
        claim, metrics=[Metric(k, v, now, 0) for k, v in measured.items() if v is not None]
    )

    if urlparse(client.tracking_uri).scheme.split("+")[0] not in EXCLUSIVE_SCHEMES:
        time.sleep(SETTLE_SECONDS)
        winner = _claims(client, experiment, model, window_id)[0]
        if winner.info.run_id != claim:
            client.delete_run(claim)
            return _record(winner)

    try:
        reference = launch(settings, pipeline, arguments)
    except Exception as e:  # recorded, then raised with its cause
        client.set_tag(claim, TAG + "outcome", Outcome.FAILED.value)
        client.set_tag(claim, TAG + "error", f"{type(e).__name__}: {e}"[:RESULT_CHARS])
        client.set_terminated(claim, RunStatus.to_string(RunStatus.FAILED))
        raise LaunchFailed(
            f"retraining {model} ({pipeline}) for window {window_id} did not launch: {e}"
        ) from e
    client.set_tag(claim, TAG + "pipeline_run", str(reference))
    client.set_tag(claim, TAG + "outcome", Outcome.LAUNCHED.value)
    client.set_terminated(claim)
    return _record(client.get_run(claim))


def champion_drop(settings: Settings, model: str, current_metric: float) -> float:
    """`performance.performance_drop` of a window's metric (the family's, as
    `performance.rolling_performance` scores it) against the one the champion was registered
    with."""
    client = registry.connect(settings)
    version = registry.alias_version(client, model, registry.Alias.CHAMPION)
    if version is None:
        raise TriggerError(f"model {model!r} has no champion to compare the metric with")
    spec = performance.METRICS[performance.family_of(model)]
    registered = performance.registered_metric(client, model, version)
    return performance.performance_drop(current_metric, registered, spec.greater_is_better)


def check_window(
    settings: Settings,
    model: str,
    window_id: str,
    current_path: Path,
    drift_share: float,
    current_metric: float | None = None,
    drift_run_id: str = "",
    *,
    launch: Launch,
) -> dict[str, Any]:
    """The monitoring pipeline's trigger step (and `contentml monitor check`'s): the decision
    and, when it retrains, the trigger record. An empty `window_id` is the current window
    file's content (`window_of`); `current_metric` (None: no ground truth yet) is compared with
    the champion's (`champion_drop`)."""
    window_id = window_id or window_of(Path(current_path))
    drop = None if current_metric is None else champion_drop(settings, model, current_metric)
    if drop is not None:
        performance.publish_drop(settings, model, drop)  # for the accuracy alert
    decision = decide(drift_share, drop)
    threshold = TriggerConfig().performance_drop
    if drop is not None and drop > threshold:
        alert = {"model": model, "drop": drop, "threshold": threshold}
        events.publish(events.EventKind.ALERT_PERFORMANCE, alert)
    record = maybe_retrain(
        settings, model, window_id, drift_share, drop, launch=launch, drift_run_id=drift_run_id
    )
    return {
        "model": model,
        "window_id": window_id,
        "retrain": decision.retrain,
        "reasons": list(decision.reasons),
        "drift_share": drift_share,
        "performance_drop": drop,
        "trigger": None if record is None else record.to_dict(),
    }
