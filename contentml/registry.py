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

A change killed at any point (SIGKILL) leaves the registry consistent, and running it again
finishes it. Its record is written first, marked pending; moving the alias is the commit
point; then the mark is removed. A pending record counts as having happened exactly when its
alias moved to its version (`_landed`): the next change of that alias found it there, or,
with none yet, it is there now. `history` reads records that way, and the next change settles
them for good (`_settle`: kept, or deleted when the alias never moved). A change whose alias
already points at its version, as recorded, does nothing: re-running a promotion that was
killed after its commit point adds no record. A rollback is done once its alias moved; running
it again rolls back one champion further, unless it names the champion it rolls back from
(`from_version`: then a re-run finds that champion gone and does nothing). Without a lock, a
pending record may belong to a change still running, so only those older than
`UNLOCKED_SETTLE_SECONDS` are settled.

Only artifacts from the registry's own store are loaded: `stored_artifact_uri` refuses a
version whose artifacts lie outside the configured artifact root (its `source` may name any
URI), and every name is checked (`contentml.names`) before it reaches the registry.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import mlflow
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.types import Schema

from contentml import events, names
from contentml.errors import UserError
from contentml.names import Alias
from contentml.settings import Settings

EVENT_TAG_PREFIX = "contentml.alias_event."
PENDING = "pending"
"""Key set (true) in an event's record while its alias move may not have happened yet."""
REDO_ATTEMPTS = 5
"""How often an unlocked change redoes itself before giving up (see the module docstring)."""
UNLOCKED_SETTLE_SECONDS = 60.0
"""Without a lock, the age from which a pending record is taken for a killed change's."""


GATE_METRIC_TAG = "contentml.gate.metric"
GATE_SCORE_TAG = "contentml.gate.score"
"""Version tags: the metric its promotion gate compared, and the version's score on it."""


class RegistryError(UserError):
    """A registry request names something that does not exist or cannot be done."""


class RegistryClient(MlflowClient):
    """An MLflow client on the settings' backend that knows the registry's own artifact store."""

    def __init__(self, settings: Settings):
        super().__init__(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
        roots = [settings.mlflow_artifact_root]
        if urlparse(settings.mlflow_tracking_uri).scheme in ("http", "https"):
            # A tracking server's proxied store (`--artifacts-destination`), named without a
            # host: a `mlflow-artifacts://host/` URI could name another server.
            roots.append("mlflow-artifacts:/")
        self.artifact_roots: tuple[str, ...] = tuple(roots)
        """Where versions' artifacts may lie: a folder, `s3://bucket/prefix`, ..."""


def connect(settings: Settings) -> RegistryClient:
    """Point MLflow at the settings' tracking and registry backend (one URI for both)."""
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    return RegistryClient(settings)


def experiment_id(client: MlflowClient, settings: Settings) -> str:
    """The training experiment, created on first use with the configured artifact root."""
    return ensure_experiment(client, settings.mlflow_experiment, settings.mlflow_artifact_root)


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name` (checked by `names.experiment_name` first), created on first
    use at `artifact_location` (None: the backend's default)."""
    name = names.experiment_name(name)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


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
    name, version = names.model_name(name), names.version(version)
    try:
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise RegistryError(f"model {name!r} has no version {version!r}") from e


def alias_version(client: MlflowClient, name: str, alias: Alias) -> str | None:
    """The version an alias points at, or None when unset."""
    name = names.model_name(name)
    try:
        return str(client.get_model_version_by_alias(name, alias.value).version)
    except MlflowException:
        return None


SEARCH_PAGE = 1_000
"""Registered models per page of a search: MLflow's largest (`SEARCH_REGISTERED_MODEL_
MAX_RESULTS_THRESHOLD`)."""


@dataclass(frozen=True)
class Aliases:
    """Every registered model's aliases at one moment, from one paged search: a model server
    compares what it serves against this each poll, one registry read per poll however many
    models it serves (one read per model and alias cost 3 ms of the GIL each on SQLite)."""

    versions: dict[str, dict[str, str]]
    """Registered model -> alias -> version."""

    def version(self, name: str, alias: Alias) -> str | None:
        """The version `alias` of model `name` points at, or None when unset."""
        return self.versions.get(name, {}).get(alias.value)

    def models(self, prefix: str = "") -> list[str]:
        """Registered models whose name starts with `prefix`, sorted."""
        return sorted(name for name in self.versions if name.startswith(prefix))


def registered_models(client: MlflowClient) -> list[RegisteredModel]:
    """Every registered model, by name, page by page: one search answers at most a page
    (MLflow's default page is 100 models, fewer than a model per niche makes)."""
    found: list[RegisteredModel] = []
    token = None
    while True:
        page = client.search_registered_models(
            max_results=SEARCH_PAGE, order_by=["name ASC"], page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            return found


def read_aliases(client: MlflowClient) -> Aliases:
    """Every registered model's aliases."""
    return Aliases(
        {
            model.name: {alias: str(v) for alias, v in model.aliases.items()}
            for model in registered_models(client)
        }
    )


_LOGGED_MODEL_URI = re.compile(r"models:/(m-[0-9a-f]+)")
"""A version's source when it was registered from an MLflow 3 logged model."""


def artifact_uri(client: MlflowClient, name: str, version: str) -> str:
    """The artifact location of a version (`s3://...` in the cluster, a local path or `file://`
    here), never a `models:/` URI."""
    found = model_version(client, name, version)
    uri = client.get_model_version_download_uri(found.name, found.version)
    if uri.startswith("models:/"):
        # A backend that stored the logged model's URI as is: follow it to its artifacts.
        logged = _LOGGED_MODEL_URI.fullmatch(found.source or "")
        model_id = found.model_id or (logged.group(1) if logged else None)
        if model_id:
            uri = client.get_logged_model(model_id).artifact_location
    if uri.startswith("models:/"):
        raise RegistryError(f"model {name!r} version {version} has no artifact location ({uri})")
    return uri


def _local_path(uri: str) -> Path | None:
    """The absolute, resolved path of a local artifact URI (as loading decodes and follows it),
    or None for a remote one."""
    parsed = urlparse(uri)
    if parsed.scheme == "":
        return Path(uri).resolve()
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path)).resolve()
    return None


def _within(uri: str, root: str) -> bool:
    """Whether artifact `uri` lies inside `root`: a folder, or a bucket and prefix."""
    path, root_path = _local_path(uri), _local_path(root)
    if path is not None or root_path is not None:
        return path is not None and root_path is not None and path.is_relative_to(root_path)
    target, base = urlparse(uri), urlparse(root)
    if (target.scheme, target.netloc) != (base.scheme, base.netloc):
        return False
    # A store may decode escapes: `%2e%2e` is `..` there.
    if {".", ".."} & set(unquote(target.path).split("/")):
        return False
    return f"{target.path.rstrip('/')}/".startswith(f"{base.path.rstrip('/')}/")


def _store_problem(client: RegistryClient, uri: str) -> str | None:
    """Why artifacts at `uri` are not the registry's own to load, or None."""
    if any(_within(uri, root) for root in client.artifact_roots):
        return None
    store = ", ".join(client.artifact_roots)
    return f"its artifacts at {uri} lie outside the registry's artifact store ({store})"


def stored_artifact_uri(client: RegistryClient, name: str, version: str) -> str:
    """`artifact_uri`, refused unless it lies in the registry's own artifact store: a version
    registered from anywhere else (`file:///etc`, another bucket) is never loaded."""
    uri = artifact_uri(client, name, version)
    problem = _store_problem(client, uri)
    if problem is not None:
        raise RegistryError(f"refusing to load model {name!r} version {version}: {problem}")
    return uri


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


def _lock_of(client: MlflowClient) -> Callable[[str, str], AbstractContextManager[None]]:
    scheme = urlparse(client.tracking_uri).scheme.split("+")[0]  # postgresql+psycopg2 -> ...
    return ALIAS_LOCKS.get(scheme, _optimistic)


def alias_lock(client: MlflowClient, name: str) -> AbstractContextManager[None]:
    """Serializes the alias changes of model `name` (see the module docstring)."""
    return _lock_of(client)(client.tracking_uri, name)


@dataclass(frozen=True)
class _Record:
    """One alias event as stored: its tag key, and whether its alias move is in doubt."""

    key: str
    event: AliasEvent
    pending: bool


def _records(model: RegisteredModel) -> list[_Record]:
    """The model's alias event records, oldest first (their keys sort in lock order)."""
    records = []
    for key in sorted(k for k in model.tags if k.startswith(EVENT_TAG_PREFIX)):
        fields = json.loads(model.tags[key])
        pending = bool(fields.pop(PENDING, False))
        records.append(_Record(key, AliasEvent(**fields), pending))
    return records


def _encoded(event: AliasEvent, *, pending: bool = False) -> str:
    return json.dumps({**asdict(event), **({PENDING: True} if pending else {})})


def _record_ns(key: str) -> int:
    """When a record was written (its key starts with the time in nanoseconds)."""
    return int(key.removeprefix(EVENT_TAG_PREFIX)[:20])


def _landed(model: RegisteredModel, records: list[_Record], index: int) -> bool:
    """Whether the pending record `records[index]` moved its alias: the next change of that
    alias found the alias at the record's version or, with none yet, the alias is there now."""
    event = records[index].event
    later = [r.event for r in records[index + 1 :] if r.event.alias == event.alias]
    found = later[0].from_version if later else model.aliases.get(event.alias)
    return str(found) == event.to_version


def _happened(model: RegisteredModel) -> list[_Record]:
    """The records of the changes that happened: done ones, and pending ones that landed."""
    records = _records(model)
    return [r for i, r in enumerate(records) if not r.pending or _landed(model, records, i)]


def _settle(client: MlflowClient, name: str) -> RegisteredModel:
    """Finish the records of changes killed mid-way: one whose alias moved is kept, one whose
    alias never moved is deleted. Returns the model as settled."""
    model = _registered_model(client, name)
    records = _records(model)
    locked = _lock_of(client) is not _optimistic
    oldest_ns = time.time_ns() - (0 if locked else int(UNLOCKED_SETTLE_SECONDS * 1e9))
    settled = 0
    for index, record in enumerate(records):
        if not record.pending or _record_ns(record.key) > oldest_ns:
            continue
        if _landed(model, records, index):
            client.set_registered_model_tag(name, record.key, _encoded(record.event))
        else:
            client.delete_registered_model_tag(name, record.key)
        settled += 1
    return _registered_model(client, name) if settled else model


def _move_alias(
    client: MlflowClient, name: str, alias: Alias, version: str, *, action: str, reason: str
) -> AliasEvent:
    """Move `alias` to `version` and record the change; the caller holds `alias_lock`. Three
    writes: the record, pending; the alias (the commit point); the record, done (see the
    module docstring)."""
    version = str(version)
    conflict = None
    for _ in range(REDO_ATTEMPTS):
        model = _settle(client, name)
        records = _records(model)
        current = model.aliases.get(alias.value)
        recorded = [r.event for r in _happened(model) if r.event.alias == alias.value]
        if str(current) == version and recorded and recorded[-1].to_version == version:
            return recorded[-1]  # moved and recorded already: a re-run has nothing left to do
        # Keys sort in lock order even when hosts' clocks disagree: never before the newest.
        newest_ns = _record_ns(records[-1].key) if records else 0
        ns = max(time.time_ns(), newest_ns + 1)
        event = AliasEvent(
            time=ns / 1e9,
            model=name,
            alias=alias.value,
            from_version=None if current is None else str(current),
            to_version=version,
            action=action,
            reason=reason,
            actor=getpass.getuser(),
        )
        key = f"{EVENT_TAG_PREFIX}{ns:020d}-{uuid.uuid4().hex[:8]}"
        client.set_registered_model_tag(name, key, _encoded(event, pending=True))
        try:
            client.set_registered_model_alias(name, alias.value, version)
        except MlflowException as e:
            # Without a lock, MLflow's own read-then-insert of the alias can collide with a
            # concurrent one (a unique-key error); the alias did not move, so try again.
            client.delete_registered_model_tag(name, key)
            conflict = e
            continue
        client.set_registered_model_tag(name, key, _encoded(event))
        # Under a lock this always holds. Without one, a concurrent change may have moved the
        # alias between our move and our record: whoever wrote the newest event fixes that.
        model = _registered_model(client, name)
        newest_key = max(r.key for r in _records(model) if r.event.alias == alias.value)
        if newest_key != key or str(model.aliases.get(alias.value)) == version:
            _announce(event)
            return event
    problem = conflict or "concurrent changes kept moving it"
    message = f"could not move {alias.value} of {name!r} ({problem}); try again"
    raise RegistryError(message) from conflict


def _announce(event: AliasEvent) -> None:
    """An `alias.changed` event, for the dashboards following `/v1/events`."""
    data = {
        "model": event.model,
        "alias": event.alias,
        "version": event.to_version,
        "from_version": event.from_version,
        "action": event.action,
        "reason": event.reason,
    }
    events.publish(events.EventKind.ALIAS_CHANGED, data)


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
    """Every alias change of a model that happened, oldest first."""
    return [record.event for record in _happened(_registered_model(client, name))]


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    name = names.model_name(name)
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        raise RegistryError(f"no registered model named {name!r}") from e


def _load_problem(uri: str) -> str | None:
    """Why the artifacts at `uri` cannot be served, or None when they load."""
    try:
        # Only whether it loads: the warnings' scan of every installed package (the larger part
        # of a `contentml promote`) is for the server's log.
        mlflow.pyfunc.load_model(uri, suppress_warnings=True)
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
    client: RegistryClient,
    name: str,
    version: str,
    alias: Alias = Alias.CHAMPION,
    reason: str = "manual promotion",
    *,
    force: bool = False,
) -> AliasEvent:
    """Point `alias` at `version`. A new champion must load and take the champion's inputs;
    `force` skips those checks and is recorded as `force-promote` with its reason. Artifacts
    outside the registry's store are refused, forced or not: no server would load them."""
    version = str(model_version(client, name, version).version)
    if force and not reason.strip():
        raise RegistryError("a forced promotion needs a reason for the history")
    uri = artifact_uri(client, name, version)
    outside = _store_problem(client, uri)
    if outside is not None:
        raise RegistryError(f"refusing to point {alias.value} of {name!r} at v{version}: {outside}")
    checked = alias == Alias.CHAMPION and not force
    # Loading can take long, and does not depend on the champion: outside the lock.
    problem = _load_problem(uri) if checked else None
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


class AlreadyRolledBack(Exception):
    """`rollback(from_version=V)` did nothing: the latest rollback already moved the champion
    away from V (a re-run of a rollback that completed)."""

    def __init__(self, event: AliasEvent):
        super().__init__(
            f"nothing to do: the champion of {event.model!r} was already rolled back from "
            f"v{event.from_version} to v{event.to_version} (by {event.actor}, {event.reason!r})"
        )
        self.event = event


def _check_rollback_from(model: RegisteredModel, from_version: str) -> None:
    """Raise unless `champion` is `from_version`: `AlreadyRolledBack` when the latest rollback
    moved it away from there, a `RegistryError` otherwise."""
    current = model.aliases.get(Alias.CHAMPION.value)
    if str(current) == from_version:
        return
    rollbacks = [
        e
        for e in (r.event for r in _happened(model))
        if e.alias == Alias.CHAMPION.value and e.action == "rollback"
    ]
    if rollbacks and rollbacks[-1].from_version == from_version:
        raise AlreadyRolledBack(rollbacks[-1])
    raise RegistryError(
        f"not rolling back {model.name!r} from v{from_version}: the champion is "
        f"{'unset' if current is None else f'v{current}'}, and no rollback moved it from "
        f"v{from_version} (see `contentml history {model.name}`)"
    )


def rollback(
    client: MlflowClient,
    name: str,
    reason: str = "manual rollback",
    *,
    from_version: str | None = None,
) -> AliasEvent:
    """Point `champion` back at the champion before it; repeated rollbacks walk further back.

    With `from_version`, only while the champion still is that version, so running the same
    rollback again does not roll back further: raises `AlreadyRolledBack` when the latest
    rollback already moved the champion away from it, and `RegistryError` when anything else
    moved it."""
    _registered_model(client, name)
    if from_version is not None:
        from_version = names.version(from_version)
    with alias_lock(client, name):
        # Settled first: a re-run that finds its rollback done also finishes that record.
        model = _settle(client, name)
        if from_version is not None:
            _check_rollback_from(model, from_version)
        # The champions in order, each rollback taking off the one it undid.
        champions: list[str] = []
        for event in (r.event for r in _happened(model)):
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
    for model in registered_models(client):
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
    client: RegistryClient,
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
    uri = artifact_uri(client, name, version)
    # The version keeps the score its gate saw: `contentml status` shows the champion's.
    client.set_model_version_tag(name, version, GATE_METRIC_TAG, metric)
    client.set_model_version_tag(name, version, GATE_SCORE_TAG, repr(float(challenger_score)))
    problem = (
        _store_problem(client, uri)
        or _load_problem(uri)
        or _signature_problem(name, version, champion)
    )
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
