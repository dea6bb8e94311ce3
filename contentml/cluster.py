"""How the platform's pods find their settings, credentials, data and nodes in the cluster.

Every pod (KFP tasks, predictors, TrainJob ranks, the MLflow and Feast servers) reads the same
`Settings` from the ConfigMap `contentml-settings` (`manifests/base/platform/settings.env`),
referenced by name, never copied into a manifest. Credentials come from Secrets the cluster's
secret store fills (docs/deploy.md), one per kind of access, and each workload names only the
keys it needs (`WORKLOAD_CREDENTIALS`): training writes to MLflow and the bucket, the pods that
serve only read, and the bearer tokens are keys a serving pod does not start without. A setting
that can carry a password (a database URL) lives in a Secret.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import Any

from contentml.settings import Settings

SETTINGS_CONFIG_MAP = "contentml-settings"
CREDENTIALS_SECRET = "contentml-credentials"
"""Write credentials: the MLflow user that logs runs and registers models, bucket keys that
write artifacts, the Optuna and Feast stores. Only KFP tasks and TrainJob ranks read it."""
READER_SECRET = "contentml-reader-credentials"
"""Read credentials of the pods that serve: an MLflow user with READ permission, bucket keys
that read the artifacts (and write only the prediction log's prefix), the Feast stores, the
RevenueOptimizer's own reward store, a read-only Hugging Face token."""
BACKEND_SECRET = "contentml-backend-credentials"
"""The backend's batch jobs: their PostgreSQL store and Redis queue (the API and its workers),
and the Redis the servers' events go through (`CONTENTML_EVENT_BUS`)."""
API_TOKEN_SECRET = "contentml-api-token"
"""`CONTENTML_API_TOKEN`, the bearer token of the model and backend routes."""
ADMIN_TOKEN_SECRET = "contentml-admin-token"
"""`CONTENTML_ADMIN_TOKEN`, the bearer token of the admin routes: a Secret of its own, so that
the services calling the model routes can be given the API token and never this one."""

PROVIDER_KEYS_SECRET = "contentml-provider-keys"
"""The hosted script providers' API keys (`OPENAI_API_KEYS`: one per line or a YAML/JSON
list), an optional key: without it the cluster's script chain is our endpoint alone."""

SECRET_VARIABLES: tuple[str, ...] = (
    "CONTENTML_FEAST_REGISTRY",  # postgresql://user:password@...
    "CONTENTML_FEAST_REDIS_URL",  # host:port,password=...
    "CONTENTML_OPTUNA_STORAGE",  # postgresql://user:password@...
    "CONTENTML_REVENUE_STORE",  # postgresql://user:password@...
    "CONTENTML_BACKEND_STORE",  # postgresql://user:password@...
    "CONTENTML_BATCH_QUEUE",  # redis://:password@host:port/db
    "CONTENTML_EVENT_BUS",  # redis://:password@host:port/db
    "MLFLOW_TRACKING_USERNAME",  # MLflow's basic auth, read by the MLflow client itself
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID",  # the artifact bucket, read by boto3
    "AWS_SECRET_ACCESS_KEY",
    "HF_TOKEN",  # gated base models on the Hugging Face hub
    "CONTENTML_API_TOKEN",  # bearer token of the model endpoints
    "CONTENTML_ADMIN_TOKEN",  # bearer token of the admin routes
    "OPENAI_API_KEYS",  # the hosted script provider's keys
)
"""Variables that hold a credential: each comes from a Secret, never from the ConfigMap."""

TOKEN_VARIABLES: dict[str, str] = {
    "CONTENTML_API_TOKEN": API_TOKEN_SECRET,
    "CONTENTML_ADMIN_TOKEN": ADMIN_TOKEN_SECRET,
}
"""Token -> its Secret. Required keys: without its token a server would answer every route
unauthenticated, so a pod whose token is missing does not start (CreateContainerConfigError)."""


class Workload(StrEnum):
    """What a pod does, which decides the credentials it gets."""

    TRAINING = "training"
    """KFP tasks and TrainJob ranks: log runs, register models, write artifacts."""
    PREDICTOR = "predictor"
    """Our runtime's predictors (`contentml serve`): load champions, serve model and admin
    routes."""
    SCRIPT = "script"
    """The script model on KServe's Hugging Face runtime and its token check, the
    InferenceService's transformer (`contentml auth-proxy`)."""
    API = "api"
    """`contentml api`: the batch jobs, the script chain, the admin routes."""
    BATCH_WORKER = "batch-worker"
    """`contentml batch worker`: loads the trend and quality champions, calls the script
    endpoint."""
    FEATURE_SERVER = "feature-server"
    """Feast's feature server: reads the registry and the online store."""
    SCHEDULER = "scheduler"
    """The schedules Job: talks to KFP with its service account's token, nothing else."""


_MLFLOW = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
_BUCKET = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
_FEAST = ("CONTENTML_FEAST_REGISTRY", "CONTENTML_FEAST_REDIS_URL")
_BACKEND = ("CONTENTML_BACKEND_STORE", "CONTENTML_BATCH_QUEUE", "CONTENTML_EVENT_BUS")

WORKLOAD_CREDENTIALS: dict[Workload, dict[str, str]] = {
    Workload.TRAINING: dict.fromkeys(
        (
            *_MLFLOW,
            *_BUCKET,
            *_FEAST,
            "CONTENTML_OPTUNA_STORAGE",
            "CONTENTML_REVENUE_STORE",
            "CONTENTML_BACKEND_STORE",  # the quality pipeline reads the review decisions
            "HF_TOKEN",
        ),
        CREDENTIALS_SECRET,
    ),
    Workload.PREDICTOR: {
        **dict.fromkeys((*_MLFLOW, *_BUCKET, *_FEAST, "CONTENTML_REVENUE_STORE"), READER_SECRET),
        # The shared store: the review queue, quarantines, the event table; and the replicas'
        # event bus (Redis pub/sub).
        "CONTENTML_BACKEND_STORE": BACKEND_SECRET,
        "CONTENTML_EVENT_BUS": BACKEND_SECRET,
        **TOKEN_VARIABLES,
    },
    # The predictor reads the hub token, its transformer (the token check) the API token.
    Workload.SCRIPT: {"HF_TOKEN": READER_SECRET, "CONTENTML_API_TOKEN": API_TOKEN_SECRET},
    # The API and the workers run the script chain: its hosted provider's keys.
    Workload.API: {
        **dict.fromkeys(_BACKEND, BACKEND_SECRET),
        **TOKEN_VARIABLES,
        "OPENAI_API_KEYS": PROVIDER_KEYS_SECRET,
    },
    Workload.BATCH_WORKER: {
        **dict.fromkeys((*_MLFLOW, *_BUCKET, *_FEAST), READER_SECRET),
        **dict.fromkeys(_BACKEND, BACKEND_SECRET),
        "CONTENTML_API_TOKEN": API_TOKEN_SECRET,
        "OPENAI_API_KEYS": PROVIDER_KEYS_SECRET,
    },
    Workload.FEATURE_SERVER: dict.fromkeys(_FEAST, READER_SECRET),
    Workload.SCHEDULER: {},
}
"""Workload -> {variable: the Secret whose key of that name it reads}: least privilege, only
training holds write credentials and only the servers of admin routes the admin token."""

CONFIG_VARIABLES: tuple[str, ...] = tuple(
    f.metadata["env"]
    for f in dataclasses.fields(Settings)
    if f.metadata["env"] not in SECRET_VARIABLES
)
"""Variables the ConfigMap `contentml-settings` holds: every other setting, so that a pod's
settings are all declared in the cluster and none falls back to a laptop default."""

SERVICE_ACCOUNT = "contentml"
"""Service account of the platform's pods; its Role allows what `contentml` does in the
cluster (TrainJobs, InferenceServices) and nothing else."""

DATA_CLAIM = "contentml-data"
DATA_MOUNT = "/var/lib/contentml/data"
"""Persistent volume claim with the reference data sets, where `CONTENTML_DATA_DIR` points."""

CPU_NODE_SELECTOR = {"contentml.io/pool": "cpu"}
GPU_NODE_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
GPU_TOLERATIONS: tuple[dict[str, str], ...] = (
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
)
"""GPU nodes are tainted so that only pods asking for GPUs land on them."""

RUN_AS_USER = 1000
"""The images' user (`Dockerfile`, `Dockerfile.training`): every pod runs as it."""

CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""Kubernetes' `restricted` pod security standard."""


def env_from() -> list[dict[str, Any]]:
    """`envFrom` of a container: all settings, by reference. Credentials come key by key
    (`secret_env`): a whole Secret would hand a pod keys it does not need."""
    return [{"configMapRef": {"name": SETTINGS_CONFIG_MAP}}]


def secret_env(workload: Workload) -> list[dict[str, Any]]:
    """`env` entries with the credentials of `workload`, each a key of its Secret: a token is a
    required key, any other optional (IAM roles instead of bucket keys, a public base model
    without HF_TOKEN)."""
    entries = []
    for name, secret in WORKLOAD_CREDENTIALS[workload].items():
        reference: dict[str, Any] = {"name": secret, "key": name}
        if name not in TOKEN_VARIABLES:
            reference["optional"] = True
        entries.append({"name": name, "valueFrom": {"secretKeyRef": reference}})
    return entries


def env_references() -> list[dict[str, Any]]:
    """Settings and training's credentials, one variable each, where only `env` is allowed (a
    TrainJob's trainer)."""
    settings = [
        {
            "name": name,
            "valueFrom": {"configMapKeyRef": {"name": SETTINGS_CONFIG_MAP, "key": name}},
        }
        for name in CONFIG_VARIABLES
    ]
    return settings + secret_env(Workload.TRAINING)
