"""Run a fine-tuning recipe where it says: in this process (`launcher: local`), or as a Kubeflow
Trainer `TrainJob` of `num_nodes` x `devices` GPUs (`launcher: trainjob`) that this process
submits and waits for. Both run the same entry point, `contentml llm finetune --config ...`.

The TrainJob references the `deepspeed-distributed` TrainingRuntime of its namespace
(`manifests/base/training/deepspeed-runtime.yaml`: upstream's OpenMPI runtime with our training
image on every node): its launcher pod runs our command, `mpirun` over the runtime's hostfile,
which starts `devices` ranks on every node; Lightning reads the ranks from MPI
(`MPIEnvironment`, which needs `mpi4py`, installed in `Dockerfile.training`). The settings
reach every rank by reference to the cluster's ConfigMap and Secret (`contentml.cluster`).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from contentml import cluster
from contentml.errors import UserError
from contentml.settings import Settings
from training.llm.config import FinetuneConfig, Launcher, load_config

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"

RUNTIME = "deepspeed-distributed"
"""The namespace's TrainingRuntime for DeepSpeed: an MPI launcher plus ssh-reachable nodes."""

RUNTIME_KIND = "TrainingRuntime"

HOSTFILE = "/etc/mpi/hostfile"
"""Where the MPI runtime mounts the hostfile: one line per node, `slots=numProcPerNode`."""

ENTRY_POINT = ["contentml", "llm", "finetune", "--config"]
"""The command every rank runs, followed by the recipe's path (relative to the image's working
directory, which `mpirun` keeps on the other nodes)."""

CPU_PER_DEVICE = 8
"""CPU cores requested per GPU: a data loader and the rank's host-side work."""

MEMORY_PER_DEVICE_GI = 48
"""Host memory per GPU: each rank loads the whole checkpoint (13.5 GB for a 7B in bf16) before
ZeRO-3 shards it, and gathers the merged model again for the export."""

DEADLINE_SECONDS = 6 * 3600
"""`activeDeadlineSeconds` of the TrainJob: the cluster stops it (and frees the GPUs) after this
long even when nobody waits for it any more."""

SCHEDULING_GRACE_SECONDS = 1800
"""How much longer than the deadline `launch` waits: time for the GPUs to be scheduled."""

POLL_SECONDS = 30.0
"""Seconds between two reads of the TrainJob's status."""

_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class TrainJobRecipeError(UserError):
    """The recipe cannot run as asked (a TrainJob from a CPU or local recipe, several nodes in
    one process)."""


class TrainJobFailed(RuntimeError):
    """The TrainJob ended with its `Failed` condition; the message carries its reason."""


class TrainJobTimeout(TimeoutError):
    """The TrainJob neither completed nor failed in the time given; it may still be running."""


class CustomObjects(Protocol):
    """The two calls of `kubernetes.client.CustomObjectsApi` that `submit_and_wait` uses."""

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict
    ) -> dict: ...

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> dict: ...


def trainjob_manifest(
    config: FinetuneConfig,
    config_path: str,
    settings: Settings,
    name: str,
    namespace: str | None = None,
    suspend: bool = False,
) -> dict:
    """The TrainJob that runs `config` (read from `config_path` in the image) on
    `config.num_nodes` nodes of `config.devices` GPUs in `settings.training_image`. Without
    `namespace`, `kubectl apply -n` (or kustomize) decides; a suspended TrainJob waits for
    `kubectl patch trainjob NAME --type=merge -p '{"spec":{"suspend":false}}'`."""
    if config.launcher != Launcher.TRAINJOB or config.accelerator != "gpu":
        raise TrainJobRecipeError(
            f"{config_path}: a TrainJob runs recipes with launcher 'trainjob' on accelerator "
            f"'gpu', not launcher {config.launcher.value!r} on {config.accelerator!r}"
        )
    if not _NAME.match(name) or len(name) > 63:
        raise TrainJobRecipeError(f"TrainJob name {name!r} is not a DNS label (RFC 1035)")
    environment = cluster.env_references()
    resources = {
        "cpu": str(CPU_PER_DEVICE * config.devices),
        "memory": f"{MEMORY_PER_DEVICE_GI * config.devices}Gi",
        "nvidia.com/gpu": str(config.devices),
    }
    # OpenMPI hands a rank started over ssh only the variables named with -x.
    exports = [flag for variable in environment for flag in ("-x", variable["name"])]
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {
            "app.kubernetes.io/part-of": "contentml",
            "app.kubernetes.io/component": "script-finetune",
            "contentml/recipe": _label_value(Path(config_path).stem),
        },
    }
    if namespace is not None:
        metadata["namespace"] = namespace
    spec: dict[str, Any] = {
        "runtimeRef": {"name": RUNTIME, "kind": RUNTIME_KIND, "apiGroup": GROUP},
        "activeDeadlineSeconds": DEADLINE_SECONDS,
    }
    if suspend:
        spec["suspend"] = True
    spec["trainer"] = {
        "image": settings.training_image,
        "numNodes": config.num_nodes,
        "numProcPerNode": config.devices,
        "command": [
            "mpirun",
            "--hostfile",
            HOSTFILE,
            "-np",
            str(config.world_size),
            "--bind-to",
            "none",
            "-x",
            "PATH",
            *exports,
        ],
        # The steps given, which a launch may have changed from the recipe's.
        "args": [*ENTRY_POINT, config_path, "--max-steps", str(config.max_steps)],
        "env": environment,
        "resourcesPerNode": {"requests": resources, "limits": resources},
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": spec,
    }


def submit_and_wait(
    manifest: dict,
    api: CustomObjects,
    poll_seconds: float = POLL_SECONDS,
    timeout_seconds: float = DEADLINE_SECONDS + SCHEDULING_GRACE_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Create the TrainJob, then read it every `poll_seconds` until its `Complete` condition is
    True (returns its status) or its `Failed` condition is (raises `TrainJobFailed`); raises
    `TrainJobTimeout` after `timeout_seconds` and leaves the TrainJob to its deadline."""
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"]["namespace"]
    where = {"group": GROUP, "version": VERSION, "namespace": namespace, "plural": PLURAL}
    api.create_namespaced_custom_object(**where, body=manifest)
    deadline = clock() + timeout_seconds
    while True:
        status = api.get_namespaced_custom_object(**where, name=name).get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        if _holds(conditions.get("Complete")):
            return status
        failed = conditions.get("Failed")
        if _holds(failed):
            raise TrainJobFailed(
                f"TrainJob {namespace}/{name} failed: {failed.get('reason', 'no reason')}: "
                f"{failed.get('message', '')}"
            )
        if clock() >= deadline:
            raise TrainJobTimeout(
                f"TrainJob {namespace}/{name} did not finish in {timeout_seconds:.0f} s; it may "
                f"still run (`kubectl delete trainjob {name} -n {namespace}` stops it)"
            )
        sleep(poll_seconds)


def launch(settings: Settings, config_path: Path, max_steps: int | None = None) -> dict:
    """Run the recipe at `config_path` (with `max_steps` instead of its own, when given) as its
    `launcher` says; returns rank 0's summary (local) or the TrainJob's name and final status
    (trainjob)."""
    config = load_config(config_path, max_steps=max_steps)
    return LAUNCHERS[config.launcher](settings, config, config_path)


def _run_local(settings: Settings, config: FinetuneConfig, config_path: Path) -> dict:
    if config.num_nodes != 1:
        raise TrainJobRecipeError(
            f"{config_path}: {config.num_nodes} nodes need launcher 'trainjob', not 'local'"
        )
    from training.llm.train import finetune

    return finetune(settings, config) or {}


def _run_trainjob(settings: Settings, config: FinetuneConfig, config_path: Path) -> dict:
    """Submit with the pod's service account in the cluster, the kube config elsewhere."""
    from kubernetes import client
    from kubernetes import config as kube_config

    try:
        kube_config.load_incluster_config()
        namespace = Path(_SERVICE_ACCOUNT_NAMESPACE).read_text().strip()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
        _, context = kube_config.list_kube_config_contexts()
        namespace = context["context"].get("namespace", "default")
    name = f"finetune-{_label_value(config_path.stem, 40)}-{uuid.uuid4().hex[:8]}"
    manifest = trainjob_manifest(config, str(config_path), settings, name, namespace)
    status = submit_and_wait(manifest, client.CustomObjectsApi())
    return {"trainjob": name, "namespace": namespace, "status": status}


LAUNCHERS: dict[Launcher, Callable[[Settings, FinetuneConfig, Path], dict]] = {
    Launcher.LOCAL: _run_local,
    Launcher.TRAINJOB: _run_trainjob,
}
"""Launcher -> how `launch` runs a recipe."""


def _holds(condition: dict[str, Any] | None) -> bool:
    return condition is not None and condition.get("status") == "True"


def _label_value(text: str, limit: int = 63) -> str:
    """`text` as lower-case letters, digits and inner dashes, at most `limit` long: safe in a
    label value and inside a TrainJob name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower())[:limit].strip("-") or "recipe"
