"""The one settings object: embedded defaults under `.contentml/`, every value overridable
from the environment so the same code runs on a laptop and in the cluster."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from contentml.errors import UserError
from contentml.names import comma_list


class SettingsError(UserError):
    """A setting has a value the platform cannot use."""


PACKAGE_ROOT = Path(__file__).resolve().parent.parent
"""The source tree: packaged defaults (YAML files) are found relative to it."""

_NUMBERS = {"int": int, "float": float}
_FLAGS = {"1": True, "true": True, "yes": True, "on": True}
_FLAGS |= {"0": False, "false": False, "no": False, "off": False}


def _env(name: str) -> dict[str, str]:
    return {"env": name}


def _flag(variable: str, raw: str) -> bool:
    try:
        return _FLAGS[raw.strip().lower()]
    except KeyError:
        raise SettingsError(
            f"{variable} must be true or false (1/0, yes/no), not {raw!r}"
        ) from None


def _number(variable: str, raw: str, kind: type) -> int | float:
    try:
        return kind(raw)
    except ValueError as e:
        raise SettingsError(
            f"{variable} must be a{'n' if kind is int else ''} {kind.__name__}, not {raw!r}"
        ) from e


@dataclass(frozen=True)
class Settings:
    home: Path = field(metadata=_env("CONTENTML_HOME"))
    """Folder holding all embedded state (MLflow, Feast, Optuna, KFP outputs)."""

    data_dir: Path = field(metadata=_env("CONTENTML_DATA_DIR"))
    """Folder with the reference data sets (`m4-hourly/`, `youtube-trending/`, `toxicity/`)."""

    mlflow_tracking_uri: str = field(metadata=_env("MLFLOW_TRACKING_URI"))
    """MLflow backend: SQLite locally, `http(s)://` server or `postgresql://` in the cluster."""

    mlflow_artifact_root: str = field(metadata=_env("CONTENTML_MLFLOW_ARTIFACT_ROOT"))
    """Where new experiments store artifacts: a local folder or `s3://bucket/prefix`."""

    mlflow_experiment: str = field(metadata=_env("CONTENTML_MLFLOW_EXPERIMENT"))
    """Experiment that training runs log to."""

    feast_project: str = field(metadata=_env("CONTENTML_FEAST_PROJECT"))
    """Feast project name; separates registries that share one store."""

    feast_registry: str = field(repr=False, metadata=_env("CONTENTML_FEAST_REGISTRY"))
    """Feast registry: a file path locally, a `postgresql://` URL in the cluster."""

    feast_online_store: str = field(metadata=_env("CONTENTML_FEAST_ONLINE_STORE"))
    """Online store kind: `sqlite` (embedded) or `redis` (cluster)."""

    feast_redis_url: str = field(repr=False, metadata=_env("CONTENTML_FEAST_REDIS_URL"))
    """Redis connection string (`host:port[,db=N]`) used when the online store is `redis`."""

    feast_data_dir: Path = field(metadata=_env("CONTENTML_FEAST_DATA_DIR"))
    """Folder of the parquet files behind Feast's file offline store."""

    optuna_storage: str = field(repr=False, metadata=_env("CONTENTML_OPTUNA_STORAGE"))
    """Optuna RDB storage URL: SQLite locally, PostgreSQL in the cluster."""

    kfp_host: str = field(metadata=_env("KFP_HOST"))
    """KFP API endpoint for cluster runs; empty means pipelines run through `kfp.local`."""

    platform_image: str = field(metadata=_env("CONTENTML_IMAGE"))
    """Container image the KFP components and predictors run in on the cluster."""

    training_image: str = field(metadata=_env("CONTENTML_TRAINING_IMAGE"))
    """GPU image (CUDA, DeepSpeed ops, OpenMPI) of the ranks of a TrainJob."""

    serving_url: str = field(metadata=_env("CONTENTML_SERVING_URL"))
    """Base URL of the model server the content pipeline's client calls."""

    published_content: Path = field(metadata=_env("CONTENTML_PUBLISHED_CONTENT"))
    """CSV of already published texts (a `text`, `tweet` or `title` column) that the quality
    gate checks new texts against for near-duplicates; by default the trending US titles."""

    script_providers: Path = field(metadata=_env("CONTENTML_SCRIPT_PROVIDERS"))
    """YAML of the script writer's fallback chain (`serving/caller/script_providers.yaml` by
    default: our own `script` endpoint only)."""

    script_max_tokens: int = field(metadata=_env("CONTENTML_SCRIPT_MAX_TOKENS"))
    """Cap on `max_tokens` the served `script` model generates per request."""

    prediction_cache: str = field(metadata=_env("CONTENTML_PREDICTION_CACHE"))
    """Cache in front of the trend, quality and niche predictors: `memory` (an LRU per model
    in the server process), `off`, or `redis://host:port/db` (shared by replicas)."""

    prediction_log: str = field(metadata=_env("CONTENTML_PREDICTION_LOG"))
    """Where the model server logs every answered trend, quality and niche instance (parquet
    part files, `serving/model_server/prediction_log.py`): a folder, an `s3://` URI, or `off`."""

    serving_poll_seconds: float = field(metadata=_env("CONTENTML_SERVING_POLL_SECONDS"))
    """How often the model server reads the aliases and swaps to the versions they name, and
    refreshes what it holds in memory from the shared stores (the trend histories of series
    asked by id, the bandits' posteriors): no answer is staler than this."""

    access_log: bool = field(metadata=_env("CONTENTML_ACCESS_LOG"))
    """Whether the model server writes a line per request (uvicorn's access log). Off by
    default: formatting and writing it held the GIL for 7 % of a cached call, and every
    request is already counted by the server's Prometheus metrics, every answered instance is
    in the prediction log, and the cluster's ingress logs requests."""

    pushgateway_url: str = field(metadata=_env("CONTENTML_PUSHGATEWAY_URL"))
    """Prometheus Pushgateway the monitoring jobs push model performance to (they are batch
    jobs, nothing scrapes them); empty: not pushed."""

    pinned_versions: str = field(metadata=_env("CONTENTML_PINNED_VERSIONS"))
    """`MODEL=VERSION[,...]`: registered models served at a fixed version, not following their
    aliases. `contentml deploy` sets it in each KServe predictor, where KServe (not the
    server) moves traffic between versions; empty elsewhere."""

    revenue_store: str = field(repr=False, metadata=_env("CONTENTML_REVENUE_STORE"))
    """Database of the RevenueOptimizer's experiments and rewards (`training/revenue/store.py`):
    SQLite locally, `postgresql://` in the cluster, shared by the server's replicas."""

    script_timeout_seconds: float = field(metadata=_env("CONTENTML_SCRIPT_TIMEOUT_SECONDS"))
    """Wall-clock limit of one generation on the served `script` model; the text so far is
    returned with `finish_reason: "length"` when it is reached."""

    backend_store: str = field(repr=False, metadata=_env("CONTENTML_BACKEND_STORE"))
    """Database of the backend's batch jobs (items, results, dead letters) and of its cost
    ledger (`serving/backend/batch/`, `serving/backend/costs.py`): SQLite locally,
    `postgresql://` in the cluster, shared by the API and the batch workers."""

    batch_queue: str = field(repr=False, metadata=_env("CONTENTML_BATCH_QUEUE"))
    """The batch workers' task queue (huey): `sqlite:///<file>` locally, `redis://host:port/db`
    in the cluster."""

    compute_usd_per_hour: float = field(metadata=_env("CONTENTML_COMPUTE_USD_PER_HOUR"))
    """Price of one hour of a serving or worker process's compute, charged to each call and
    batch job by the seconds it took (`contentml costs`)."""

    max_concurrent_requests: int = field(metadata=_env("CONTENTML_MAX_CONCURRENT_REQUESTS"))
    """Requests one model takes at once on one route (V1, V2, OpenAI, task routes); the next
    is answered 429 with `Retry-After` at once instead of queueing (`serving/admission.py`)."""

    shutdown_drain_seconds: float = field(metadata=_env("CONTENTML_SHUTDOWN_DRAIN_SECONDS"))
    """After SIGTERM, how long the server answers readiness with 503 while still serving every
    request, so the cluster stops routing to it before it stops listening."""

    shutdown_grace_seconds: float = field(metadata=_env("CONTENTML_SHUTDOWN_GRACE_SECONDS"))
    """After the drain, how long the server waits for requests in flight before cancelling
    them; models are unloaded only then. The pod's `terminationGracePeriodSeconds` must exceed
    drain + grace."""

    event_bus: str = field(repr=False, metadata=_env("CONTENTML_EVENT_BUS"))
    """How events (`contentml/events.py`, `GET /v1/events`) cross processes: `sql`, a table in
    `backend_store` every server tails (embedded), or `redis://host:port/db`, Redis pub/sub
    every replica subscribes to (the cluster)."""

    review_expiry_hours: float = field(metadata=_env("CONTENTML_REVIEW_EXPIRY_HOURS"))
    """How long a text sent to human review may wait for a decision before it is escalated
    (`review.expired`, `contentml_review_items{status="overdue"}`); it stays in the queue."""

    api_token: str = field(repr=False, metadata=_env("CONTENTML_API_TOKEN"))
    """Bearer token every route of the model server and backend API requires, but health and
    /metrics (a Secret in the cluster); empty: no check, and the servers listen on loopback
    only unless told `--insecure`."""

    admin_token: str = field(repr=False, metadata=_env("CONTENTML_ADMIN_TOKEN"))
    """Bearer token of the admin routes (`serving.admission.ADMIN_ROUTES`: load and unload,
    quarantine and release, rewards, the batch job listing), a Secret of its own; it also opens
    every other route. Empty: the admin routes are as open as the others where no
    `api_token` is set, and closed where one is."""

    def __post_init__(self) -> None:
        if self.feast_online_store not in ("sqlite", "redis"):
            raise SettingsError(
                f"CONTENTML_FEAST_ONLINE_STORE must be 'sqlite' or 'redis', "
                f"not {self.feast_online_store!r}"
            )
        for name in (
            "mlflow_tracking_uri",
            "feast_project",
            "optuna_storage",
            "serving_url",
            "prediction_log",
            "revenue_store",
            "backend_store",
            "batch_queue",
        ):
            if not getattr(self, name):
                raise SettingsError(f"setting {name} must not be empty")
        self.pinned()  # names a malformed value now, not at the first request
        for name in (
            "script_max_tokens",
            "script_timeout_seconds",
            "serving_poll_seconds",
            "max_concurrent_requests",
            "shutdown_grace_seconds",
            "review_expiry_hours",
        ):
            if not getattr(self, name) > 0:
                raise SettingsError(f"setting {name} must be positive, not {getattr(self, name)}")
        for name in ("compute_usd_per_hour", "shutdown_drain_seconds"):
            if not getattr(self, name) >= 0:
                raise SettingsError(f"setting {name} must be >= 0, not {getattr(self, name)}")
        # Sent as `Authorization: Bearer <token>`: a space or non-ASCII character would never
        # match. The message never quotes the token.
        for variable, token in (
            ("CONTENTML_API_TOKEN", self.api_token),
            ("CONTENTML_ADMIN_TOKEN", self.admin_token),
        ):
            if not re.fullmatch(r"[!-~]*", token):
                raise SettingsError(f"{variable} must be printable ASCII without spaces")
        if self.admin_token and self.admin_token == self.api_token:
            raise SettingsError(
                "CONTENTML_ADMIN_TOKEN must differ from CONTENTML_API_TOKEN: "
                "every caller holds the callers' token"
            )
        if self.event_bus != "sql" and not self.event_bus.startswith(("redis://", "rediss://")):
            raise SettingsError(
                "CONTENTML_EVENT_BUS must be sql or redis://host:port/db, "
                f"not a {self.event_bus.partition(':')[0]}: URL"
            )
        if not self.batch_queue.startswith(("sqlite:///", "redis://", "rediss://")):
            raise SettingsError(
                "CONTENTML_BATCH_QUEUE must be sqlite:///<file> or redis://host:port/db, "
                f"not a {self.batch_queue.partition(':')[0]}: URL"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from the environment; unset values take the embedded defaults."""
        environ = os.environ if environ is None else environ
        home = Path(environ.get("CONTENTML_HOME", ".contentml")).resolve()
        data_dir = Path(environ.get("CONTENTML_DATA_DIR", "../shared/data")).resolve()
        defaults = {
            "home": home,
            "data_dir": data_dir,
            "mlflow_tracking_uri": f"sqlite:///{home / 'mlflow.db'}",
            "mlflow_artifact_root": str(home / "mlartifacts"),
            "mlflow_experiment": "contentml",
            "feast_project": "contentml",
            "feast_registry": str(home / "feast" / "registry.db"),
            "feast_online_store": "sqlite",
            "feast_redis_url": "127.0.0.1:6379",
            "feast_data_dir": home / "feast" / "data",
            "optuna_storage": f"sqlite:///{home / 'optuna.db'}",
            "kfp_host": "",
            "platform_image": "ghcr.io/contentml/platform:0.1.0",
            "training_image": "ghcr.io/contentml/training:0.1.0",
            "serving_url": "http://127.0.0.1:8080",
            "published_content": data_dir / "youtube-trending" / "USvideos.csv",
            "script_providers": PACKAGE_ROOT / "serving" / "caller" / "script_providers.yaml",
            "script_max_tokens": 512,
            "script_timeout_seconds": 30.0,
            "prediction_cache": "memory",
            "prediction_log": str(home / "predictions"),
            "serving_poll_seconds": 2.0,
            "access_log": False,
            "pinned_versions": "",
            "pushgateway_url": "",
            "revenue_store": f"sqlite:///{home / 'revenue.db'}",
            "backend_store": f"sqlite:///{home / 'backend.db'}",
            "batch_queue": f"sqlite:///{home / 'batch-queue.db'}",
            # A 2-vCPU on-demand instance's price per hour, about what one replica costs.
            "compute_usd_per_hour": 0.10,
            "max_concurrent_requests": 32,
            # A second on a laptop; the cluster's ConfigMap waits for its routes to update.
            "shutdown_drain_seconds": 1.0,
            "shutdown_grace_seconds": 30.0,
            "event_bus": "sql",
            # A working day: a text waiting longer holds up its video.
            "review_expiry_hours": 24.0,
            "api_token": "",
            "admin_token": "",
        }
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None:
                values[f.name] = defaults[f.name]
            elif f.type == "Path":
                values[f.name] = Path(raw).resolve()
            elif f.type == "bool":
                values[f.name] = _flag(f.metadata["env"], raw)
            elif f.type in _NUMBERS:
                values[f.name] = _number(f.metadata["env"], raw, _NUMBERS[f.type])
            else:
                values[f.name] = raw
        return cls(**values)

    def pinned(self) -> dict[str, str]:
        """`pinned_versions` as {registered model: version}."""
        pins = {}
        for item in comma_list(self.pinned_versions):
            name, _, version = item.partition("=")
            if not name or not version.isdigit():
                raise SettingsError(
                    f"CONTENTML_PINNED_VERSIONS takes MODEL=VERSION[,...], not {item!r}"
                )
            pins[name] = version
        return pins

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process (KFP tasks)."""
        return {f.metadata["env"]: str(getattr(self, f.name)) for f in dataclasses.fields(self)}
