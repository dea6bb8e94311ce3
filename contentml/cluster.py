"""How the platform's pods find their settings, credentials, data and nodes in the cluster.

Every pod (KFP tasks, predictors, TrainJob ranks, the MLflow and Feast servers) reads the same
`Settings` from two objects referenced by name, never copied into a manifest: the ConfigMap
`contentml-settings` (`manifests/base/platform/settings.env`) and the Secret
`contentml-credentials`, which the cluster's secret store fills (docs/deploy.md). A setting
that can carry a password (a database URL) lives in the Secret.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from contentml.settings import Settings

SETTINGS_CONFIG_MAP = "contentml-settings"
CREDENTIALS_SECRET = "contentml-credentials"

SECRET_VARIABLES: tuple[str, ...] = (
    "CONTENTML_FEAST_REGISTRY",  # postgresql://user:password@...
    "CONTENTML_FEAST_REDIS_URL",  # host:port,password=...
    "CONTENTML_OPTUNA_STORAGE",  # postgresql://user:password@...
    "CONTENTML_REVENUE_STORE",  # postgresql://user:password@...
    "CONTENTML_BACKEND_STORE",  # postgresql://user:password@...
    "CONTENTML_BATCH_QUEUE",  # redis://:password@host:port/db
    "MLFLOW_TRACKING_USERNAME",  # MLflow's basic auth, read by the MLflow client itself
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID",  # the artifact bucket, read by boto3
    "AWS_SECRET_ACCESS_KEY",
    "HF_TOKEN",  # gated base models on the Hugging Face hub
    "CONTENTML_API_TOKEN",  # bearer token of the model endpoints
)
"""Variables the Secret `contentml-credentials` holds."""

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
    """`envFrom` of a container: all settings and credentials, by reference."""
    return [
        {"configMapRef": {"name": SETTINGS_CONFIG_MAP}},
        # Optional: a credential the cluster does without (IAM roles instead of AWS keys).
        {"secretRef": {"name": CREDENTIALS_SECRET, "optional": True}},
    ]


def env_references() -> list[dict[str, Any]]:
    """The same as `env_from`, one variable each, where only `env` is allowed (a TrainJob's
    trainer)."""
    settings = [
        {
            "name": name,
            "valueFrom": {"configMapKeyRef": {"name": SETTINGS_CONFIG_MAP, "key": name}},
        }
        for name in CONFIG_VARIABLES
    ]
    credentials = [
        {
            "name": name,
            "valueFrom": {
                "secretKeyRef": {"name": CREDENTIALS_SECRET, "key": name, "optional": True}
            },
        }
        for name in SECRET_VARIABLES
    ]
    return settings + credentials
