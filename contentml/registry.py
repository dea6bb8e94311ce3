"""MLflow registry helpers: aliases with a durable history, promotion gate, rollback.

MLflow keeps no history of alias changes, so each change is also written as a registered-model
tag of its own (`contentml.alias_event.<time>-<id>`): one key per event, so concurrent changes
never overwrite each other's record, and it works on every MLflow backend (SQLite, PostgreSQL,
a tracking server).

Reading the alias, moving it and writing the event are three registry calls, so two concurrent
changes could both record the same `from_version`. Every change therefore runs under a per-model
lock chosen by the tracking URI's scheme (`ALIAS_LOCKS`), with these guarantees:

- `postgresql://`: a PostgreSQL advisory lock in the same database. Changes from any number of
  hosts are serialized: each event's `from_version` is exact, the events chain, and the alias
  ends where the newest event says.
- `sqlite://`: an `flock` on a file beside the database: the same, for the processes of the one
  host that can open the database.
- `http(s)://` (a tracking server) and any other scheme: no lock is possible through MLflow's
  API, so after writing, the change re-reads the model and redoes itself when its event is the
  newest but the alias was moved by a concurrent change in between. Every change is recorded and
  the alias ends where the newest event says, but under concurrent changes an event's
  `from_version` can be stale.

Both locks are released by the kernel or the server when the holding process dies.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from urllib.parse import urlparse

import mlflow
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.types import Schema

from contentml.errors import UserError
from contentml.settings import Settings

EVENT_TAG_PREFIX = "contentml.alias_event."
REDO_ATTEMPTS = 5
"""How often an unlocked change redoes itself before giving up (see the module docstring)."""


class Alias(StrEnum):
    """The roadmap's three versions per model."""

    CHAMPION = "champion"  # stable: what serving loads
    CHALLENGER = "challenger"  # candidate: newest trained, waiting for the gate
    EXPERIMENTAL = "experimental"


class RegistryError(UserError):
    """A registry request names something that does not exist or cannot be done."""


def connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the settings' tracking and registry backend (one URI for both)."""
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


@contextmanager
def _sqlite_file_lock(uri: str, name: str) -> Iterator[None]:
    # SQLite has no advisory locks; one lock file per database is enough, since SQLite
    # serializes its writers anyway.
    database = urlparse(uri).path[1:]  # sqlite:///relative.db, sqlite:////absolute.db
    if not database or database == ":memory:":
        yield  # an in-memory database has no other process to race with
        return
    with open(f"{database}.alias-lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@contextmanager
def _postgres_advisory_lock(uri: str, name: str) -> Iterator[None]:
    import psycopg
    from sqlalchemy.engine import make_url

    # libpq takes the URI without SQLAlchemy's driver suffix (postgresql+psycopg2://).
    url = make_url(uri).set(drivername="postgresql").render_as_string(hide_password=False)
    digest = hashlib.blake2b(f"contentml.alias.{name}".encode(), digest_size=8).digest()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SELECT pg_advisory_lock(%s)", (int.from_bytes(digest, signed=True),))
        yield  # closing the session releases the lock


@contextmanager
def _optimistic(uri: str, name: str) -> Iterator[None]:
    yield  # nothing to lock: `_move_alias` checks its write and redoes it instead


ALIAS_LOCKS: dict[str, Callable[[str, str], AbstractContextManager[None]]] = {
    "sqlite": _sqlite_file_lock,
    "postgresql": _postgres_advisory_lock,
    "http": _optimistic,
    "https": _optimistic,
}


def alias_lock(client: MlflowClient, name: str) -> AbstractContextManager[None]:
    """Serializes the alias changes of model `name` (see the module docstring)."""
    uri = client.tracking_uri
    scheme = urlparse(uri).scheme.split("+")[0]  # postgresql+psycopg2 -> postgresql
    return ALIAS_LOCKS.get(scheme, _optimistic)(uri, name)


def _events(model: RegisteredModel) -> list[tuple[str, AliasEvent]]:
    """The model's alias events with their tag keys, oldest first."""
    keys = sorted(k for k in model.tags if k.startswith(EVENT_TAG_PREFIX))
    return [(k, AliasEvent(**json.loads(model.tags[k]))) for k in keys]


def _move_alias(
    client: MlflowClient, name: str, alias: Alias, version: str, *, action: str, reason: str
) -> AliasEvent:
    """Move `alias` to `version` and record the change; the caller holds `alias_lock`."""
    conflict = None
    for _ in range(REDO_ATTEMPTS):
        model = _registered_model(client, name)
        events = _events(model)
        # Keys sort in lock order even when hosts' clocks disagree: never before the newest.
        newest_ns = int(events[-1][0].removeprefix(EVENT_TAG_PREFIX)[:20]) if events else 0
        ns = max(time.time_ns(), newest_ns + 1)
        current = model.aliases.get(alias.value)
        event = AliasEvent(
            time=ns / 1e9,
            model=name,
            alias=alias.value,
            from_version=None if current is None else str(current),
            to_version=str(version),
            action=action,
            reason=reason,
            actor=getpass.getuser(),
        )
        try:
            client.set_registered_model_alias(name, alias.value, str(version))
        except MlflowException as e:
            # Without a lock, MLflow's own read-then-insert of the alias can collide with a
            # concurrent one (a unique-key error); nothing was recorded, so try again.
            conflict = e
            continue
        key = f"{EVENT_TAG_PREFIX}{ns:020d}-{uuid.uuid4().hex[:8]}"
        client.set_registered_model_tag(name, key, json.dumps(asdict(event)))
        # Under a lock this always holds. Without one, a concurrent change may have moved the
        # alias between our move and our record: whoever wrote the newest event fixes that.
        model = _registered_model(client, name)
        newest_key = max(k for k, e in _events(model) if e.alias == alias.value)
        if newest_key != key or str(model.aliases.get(alias.value)) == str(version):
            return event
    problem = conflict or "concurrent changes kept moving it"
    message = f"could not move {alias.value} of {name!r} ({problem}); try again"
    raise RegistryError(message) from conflict


def register_challenger(client: MlflowClient, name: str, version: str, reason: str) -> AliasEvent:
    """A newly trained version becomes the `challenger` (recorded as action `register`)."""
    return set_alias(client, name, Alias.CHALLENGER, version, action="register", reason=reason)


def set_alias(
    client: MlflowClient, name: str, alias: Alias, version: str, *, action: str, reason: str
) -> AliasEvent:
    """Move `alias` to `version` and record the change in the model's history."""
    model_version(client, name, version)
    with alias_lock(client, name):
        return _move_alias(client, name, alias, version, action=action, reason=reason)


def history(client: MlflowClient, name: str) -> list[AliasEvent]:
    """Every recorded alias change of a model, oldest first."""
    return [event for _, event in _events(_registered_model(client, name))]


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        raise RegistryError(f"no registered model named {name!r}") from e


def _load_problem(name: str, version: str) -> str | None:
    """Why the version's artifacts cannot be served, or None when they load."""
    try:
        mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    except Exception as e:  # whatever the cause, serving would fail the same way
        first_line = next(iter(str(e).splitlines()), "")
        return f"artifacts do not load ({type(e).__name__}: {first_line})"
    return None


def _input_types(schema: Schema) -> dict[str | int, str]:
    """Each input's type as text, keyed by its name (its position when unnamed)."""
    types = {}
    for key, spec in zip(schema.input_names(), schema.inputs, strict=True):
        described = {k: v for k, v in spec.to_dict().items() if k not in ("name", "required")}
        types[key] = described["type"] if len(described) == 1 else json.dumps(described)
    return types


def _signature_problem(name: str, version: str, champion: str | None) -> str | None:
    """Why `version` cannot take the inputs `champion` takes, or None when it can."""
    if champion is None or champion == str(version):
        return None
    try:
        theirs = mlflow.models.get_model_info(f"models:/{name}/{champion}").signature
    except MlflowException:
        return None  # a champion whose artifacts are gone: replacing it must stay possible
    if theirs is None or theirs.inputs is None:
        return None  # the champion promised callers nothing
    ours = mlflow.models.get_model_info(f"models:/{name}/{version}").signature
    prefix = f"signature incompatible with champion v{champion}"
    if ours is None or ours.inputs is None:
        return f"{prefix}: v{version} has no input signature"
    wanted, offered = _input_types(theirs.inputs), _input_types(ours.inputs)
    for key, kind in wanted.items():
        if offered.get(key) != kind:
            return f"{prefix}: input {key!r} is {offered.get(key, 'missing')}, champion's is {kind}"
    extra = [key for key in ours.inputs.required_input_names() if key not in wanted]
    if extra:
        return f"{prefix}: v{version} requires input {extra[0]!r} the champion does not take"
    return None


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    alias: Alias = Alias.CHAMPION,
    reason: str = "manual promotion",
    *,
    force: bool = False,
) -> AliasEvent:
    """Point `alias` at `version`. A new champion must load and take the champion's inputs;
    `force` skips those checks and is recorded as `force-promote` with its reason."""
    model_version(client, name, version)
    if force and not reason.strip():
        raise RegistryError("a forced promotion needs a reason for the history")
    checked = alias == Alias.CHAMPION and not force
    # Loading can take long, and does not depend on the champion: outside the lock.
    problem = _load_problem(name, version) if checked else None
    with alias_lock(client, name):
        if checked and problem is None:
            champion = alias_version(client, name, Alias.CHAMPION)
            problem = _signature_problem(name, version, champion)
        if problem is not None:
            raise RegistryError(
                f"refusing to make v{version} the champion of {name!r}: {problem} "
                "(--force --reason TEXT overrides)"
            )
        action = "force-promote" if force else "promote"
        return _move_alias(client, name, alias, version, action=action, reason=reason)


def rollback(client: MlflowClient, name: str, reason: str = "manual rollback") -> AliasEvent:
    """Point `champion` back at the champion before it; repeated rollbacks walk further back."""
    _registered_model(client, name)
    with alias_lock(client, name):
        # The champions in order, each rollback taking off the one it undid.
        champions: list[str] = []
        for event in history(client, name):
            if event.alias != Alias.CHAMPION.value:
                continue
            if event.action == "rollback":
                champions = champions[:-1]
            elif not champions or champions[-1] != event.to_version:
                champions.append(event.to_version)
        if len(champions) < 2:
            raise RegistryError(f"model {name!r} has no previous champion to roll back to")
        return _move_alias(
            client, name, Alias.CHAMPION, champions[-2], action="rollback", reason=reason
        )


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
    """Make `version` the champion only when its artifacts load, it takes the champion's inputs,
    and it beats the champion on the same evaluation.

    `score_champion(model_uri)` evaluates the current champion on the data the challenger was
    scored on; `margin` is how much better (in the metric's units) the challenger must be.
    """
    version = str(version)

    def refuse(champion_score: float | None, reason: str) -> GateDecision:
        return GateDecision(False, metric, challenger_score, champion_score, reason)

    champion = alias_version(client, name, Alias.CHAMPION)
    if champion == version:
        return refuse(challenger_score, f"version {version} already is the champion")
    problem = _load_problem(name, version) or _signature_problem(name, version, champion)
    if problem is not None:
        return refuse(None, f"v{version}: {problem}")
    champion_score = None
    if champion is not None:
        # Scoring can take minutes: outside the lock, checked below to still be current.
        champion_score = score_champion(f"models:/{name}/{champion}")
        improvement = (
            challenger_score - champion_score
            if greater_is_better
            else champion_score - challenger_score
        )
        if improvement <= margin:
            return refuse(
                champion_score,
                f"{metric} {challenger_score:.4f} does not beat champion "
                f"v{champion}'s {champion_score:.4f} by more than {margin}",
            )
    reason = (
        f"first champion ({metric} {challenger_score:.4f})"
        if champion is None
        else f"{metric} {challenger_score:.4f} beats v{champion}'s {champion_score:.4f}"
    )
    with alias_lock(client, name):
        current = alias_version(client, name, Alias.CHAMPION)
        if current != champion:
            return refuse(
                champion_score,
                f"another change moved the champion to v{current} during the evaluation",
            )
        _move_alias(client, name, Alias.CHAMPION, version, action="gate", reason=reason)
    return GateDecision(True, metric, challenger_score, champion_score, reason)
