"""The script model's pipeline: one fine-tuning task, local or a TrainJob by the recipe."""

from kfp import dsl

from components.llm import finetune_script
from pipelines.platform import Pool, on_cluster

# The task's request: enough for a `launcher: local` recipe such as tiny-cpu. A `trainjob`
# recipe's GPUs are requested by its TrainJob; the task then only submits and waits.
LOCAL_CPU = "2"
LOCAL_MEMORY = "8G"


def _finetune(config: str, max_steps: int) -> dsl.PipelineTask:
    task = finetune_script(config=config, max_steps=max_steps)
    task.set_cpu_request(LOCAL_CPU).set_memory_request(LOCAL_MEMORY)
    # Each run trains and registers a new version: a cached result would skip both.
    task.set_caching_options(False)
    return task


@dsl.pipeline(
    name="script-finetune",
    description="LoRA fine-tune the script model with DeepSpeed from a recipe in "
    "training/llm/configs (in the task, or as a Kubeflow Trainer TrainJob of num_nodes x "
    "devices GPUs), register it in MLflow as `script` and gate it on validation bits per byte.",
)
def script_finetune(
    config: str = "training/llm/configs/tiny-cpu.yaml",
    node_pool: str = Pool.CPU.value,
    max_steps: int = 0,
) -> dict:
    """Parameters are the launch form in the KFP UI.

    config: the recipe, relative to the platform image's working directory
        (`training/llm/configs/a100x16.yaml` for 2 nodes x 8 A100).
    node_pool: where the task runs: `cpu`, or `gpu` (one A100) for a `launcher: local` recipe
        on one GPU. A `trainjob` recipe's task only submits and waits: leave it on `cpu`.
    max_steps: optimizer steps, replacing the recipe's when above 0 (for a short run).

    Returns the fine-tuning summary (local) or the TrainJob's name and final status.
    """
    # The pool is a pod's placement, fixed when the pipeline compiles: one task per pool, and
    # the run takes the branch its `node_pool` names (anything but `gpu` runs on the CPUs).
    with dsl.If(node_pool == Pool.GPU.value, name="gpu-pool"):
        on_gpu = _finetune(config, max_steps)
    with dsl.Else(name="cpu-pool"):
        on_cpu = _finetune(config, max_steps)
    on_cluster(on_gpu, pool=Pool.GPU)
    on_cluster(on_cpu, pool=Pool.CPU)
    return dsl.OneOf(on_gpu.output, on_cpu.output)
