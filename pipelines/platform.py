"""Where a pipeline task runs in the cluster: its settings, credentials, data and node pool.

kfp-kubernetes writes these into the compiled YAML's `platforms.kubernetes` section, which only
the cluster's KFP reads: `kfp.local` runs the same pipeline on this machine and ignores it, so
one compiled YAML per pipeline serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kfp import dsl, kubernetes

from contentml import cluster
from contentml.settings import Settings


class Pool(StrEnum):
    """The cluster's node pools: a pipeline parameter's value where a pipeline lets its user
    choose (`script-finetune`'s `node_pool`)."""

    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True)
class Placement:
    image: str
    """The image a task runs in on this pool: CUDA and DeepSpeed's ops on the GPUs."""
    node_selector: dict[str, str]
    """Labels of the pool's nodes."""
    tolerations: tuple[dict[str, str], ...] = ()
    """Taints of the pool's nodes that the task tolerates."""
    gpus: int = 0
    """`nvidia.com/gpu` the task's container asks for."""


# Resolved when the pipeline is compiled, as the components' base image.
_SETTINGS = Settings.from_env()

POOL_TO_PLACEMENT: dict[Pool, Placement] = {
    Pool.CPU: Placement(_SETTINGS.platform_image, cluster.CPU_NODE_SELECTOR),
    # One A100 for a `launcher: local` recipe; a TrainJob asks for its own GPUs.
    Pool.GPU: Placement(
        _SETTINGS.training_image, cluster.GPU_NODE_SELECTOR, cluster.GPU_TOLERATIONS, gpus=1
    ),
}

GPU_RESOURCE = "nvidia.com/gpu"
"""The NVIDIA device plugin's resource name."""


def on_cluster(*tasks: dsl.PipelineTask, pool: Pool = Pool.CPU) -> None:
    """Give each task the platform's settings (ConfigMap) and credentials (Secret) as
    environment variables, by reference, the data claim at `cluster.DATA_MOUNT`, the images'
    non-root user, and the image and nodes of `pool`. A pipeline calls it once with all its tasks;
    tests/e2e/test_pipelines.py checks that none is left out."""
    placement = POOL_TO_PLACEMENT[pool]
    for task in tasks:
        task.set_container_image(placement.image)
        kubernetes.use_config_map_as_env(
            task, cluster.SETTINGS_CONFIG_MAP, {name: name for name in cluster.CONFIG_VARIABLES}
        )
        # Training's write credentials, each optional: a credential the cluster does without
        # (IAM roles instead of AWS keys). No task calls an endpoint: no token.
        kubernetes.use_secret_as_env(
            task,
            cluster.CREDENTIALS_SECRET,
            {name: name for name in cluster.WORKLOAD_CREDENTIALS[cluster.Workload.TRAINING]},
            optional=True,
        )
        kubernetes.mount_pvc(task, cluster.DATA_CLAIM, cluster.DATA_MOUNT)
        kubernetes.set_security_context(task, run_as_user=cluster.RUN_AS_USER, run_as_non_root=True)
        for key, value in placement.node_selector.items():
            kubernetes.add_node_selector(task, key, value)
        for toleration in placement.tolerations:
            kubernetes.add_toleration(task, **toleration)
        if placement.gpus:
            task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(placement.gpus)
