"""MLflow registry helpers: aliases with a durable history, promotion gate, rollback.

MLflow keeps no history of alias changes, so each change is also written as a registered-model
tag of its own (`contentml.alias_event.<time>-<id>`): one key per event, so concurrent changes
never overwrite each other's record, and it works on every MLflow backend (SQLite, PostgreSQL,
a tracking server).
"""

from __future__ import annotations

import getpass
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from contentml.errors import UserError
from contentml.settings import Settings

EVENT_TAG_PREFIX = "contentml.alias_event."


class Alias(StrEnum):
    """The roadmap's three versions per model."""

    CHAMPION = "champion"  # stable: what serving loads
    CHALLENGER = "challenger"  # candidate: newest trained, waiting for the gate
    EXPERIMENTAL = "experimental"


class RegistryError(UserError):
    """A registry request names something that does not exist or cannot be done."""


def connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the settings' tracking and registry backend."""
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    return MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)


def experiment_id(client: MlflowClient, settings: Settings) -> str:
    """The training experiment, created on first use with the configured artifact root."""
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            settings.mlflow_experiment, artifact_location=settings.mlflow_artifact_root
        )
    except MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(settings.mlflow_experiment).experiment_id


@dataclass(frozen=True)
class AliasEvent:
    time: float
    model: str
    alias: str
    from_version: str | None
    to_version: str
    action: str
    reason: str
    actor: str


def model_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    """A registered version, or a `RegistryError` naming the model and version."""
    version = str(version)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"model {name!r} has no version {version!r}") from e


def alias_version(client: MlflowClient, name: str, alias: Alias) -> str | None:
    """The version an alias points at, or None when unset."""
    try:
        return str(client.get_model_version_by_alias(name, alias.value).version)
    except MlflowException:
        return None


def load_champion(settings: Settings, name: str) -> tuple[str, mlflow.pyfunc.PyFuncModel]:
    """The champion's version and its pyfunc: what a predictor serves."""
    client = connect(settings)
    version = alias_version(client, name, Alias.CHAMPION)
    if version is None:
        raise RegistryError(f"model {name!r} has no champion to serve")
    return version, mlflow.pyfunc.load_model(f"models:/{name}/{version}")


def set_alias(
    client: MlflowClient, name: str, alias: Alias, version: str, *, action: str, reason: str
) -> AliasEvent:
    """Move `alias` to `version` and record the change in the model's history."""
    model_version(client, name, version)
    event = AliasEvent(
        time=time.time(),
        model=name,
        alias=alias.value,
        from_version=alias_version(client, name, alias),
        to_version=str(version),
        action=action,
        reason=reason,
        actor=getpass.getuser(),
    )
    client.set_registered_model_alias(name, alias.value, str(version))
    key = f"{EVENT_TAG_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    client.set_registered_model_tag(name, key, json.dumps(asdict(event)))
    return event


def history(client: MlflowClient, name: str) -> list[AliasEvent]:
    """Every recorded alias change of a model, oldest first."""
    model = _registered_model(client, name)
    keys = sorted(k for k in model.tags if k.startswith(EVENT_TAG_PREFIX))
    return [AliasEvent(**json.loads(model.tags[k])) for k in keys]


def _registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        raise RegistryError(f"no registered model named {name!r}") from e


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    alias: Alias = Alias.CHAMPION,
    reason: str = "manual promotion",
) -> AliasEvent:
    return set_alias(client, name, alias, version, action="promote", reason=reason)


def rollback(client: MlflowClient, name: str, reason: str = "manual rollback") -> AliasEvent:
    """Point `champion` back at the version it pointed to before its last change."""
    champion_events = [e for e in history(client, name) if e.alias == Alias.CHAMPION.value]
    if not champion_events or champion_events[-1].from_version is None:
        raise RegistryError(f"model {name!r} has no previous champion to roll back to")
    previous = champion_events[-1].from_version
    return set_alias(client, name, Alias.CHAMPION, previous, action="rollback", reason=reason)


def list_models(client: MlflowClient) -> list[dict]:
    """Registered models with their versions and aliases, for `contentml models list`."""
    listing = []
    for model in client.search_registered_models(order_by=["name ASC"]):
        versions = client.search_model_versions(f"name = '{model.name}'")
        listing.append(
            {
                "name": model.name,
                "aliases": {alias: str(v) for alias, v in sorted(model.aliases.items())},
                "versions": [
                    {
                        "version": str(v.version),
                        "run_id": v.run_id,
                        "status": v.status,
                        "created": v.creation_timestamp,
                    }
                    for v in sorted(versions, key=lambda v: int(v.version))
                ],
            }
        )
    return listing


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    metric: str
    challenger: float
    champion: float | None
    reason: str


def promotion_gate(
    client: MlflowClient,
    name: str,
    version: str,
    *,
    metric: str,
    greater_is_better: bool,
    challenger_score: float,
    score_champion: Callable[[str], float],
    margin: float = 0.0,
) -> GateDecision:
    """Make `version` the champion only when it beats the champion on the same evaluation.

    `score_champion(model_uri)` evaluates the current champion on the data the challenger was
    scored on; `margin` is how much better (in the metric's units) the challenger must be.
    """
    champion = alias_version(client, name, Alias.CHAMPION)
    if champion == str(version):
        return GateDecision(
            False,
            metric,
            challenger_score,
            challenger_score,
            f"version {version} already is the champion",
        )
    champion_score = None
    if champion is not None:
        champion_score = score_champion(f"models:/{name}/{champion}")
        improvement = (
            challenger_score - champion_score
            if greater_is_better
            else champion_score - challenger_score
        )
        if improvement <= margin:
            return GateDecision(
                False,
                metric,
                challenger_score,
                champion_score,
                f"{metric} {challenger_score:.4f} does not beat champion "
                f"v{champion}'s {champion_score:.4f} by more than {margin}",
            )
    reason = (
        f"first champion ({metric} {challenger_score:.4f})"
        if champion is None
        else f"{metric} {challenger_score:.4f} beats v{champion}'s {champion_score:.4f}"
    )
    set_alias(client, name, Alias.CHAMPION, version, action="gate", reason=reason)
    return GateDecision(True, metric, challenger_score, champion_score, reason)
