"""The script model's pipeline: one fine-tuning task, local or a TrainJob by the recipe."""

from kfp import dsl

from components.llm import finetune_script

# The task's request: enough for a `launcher: local` recipe such as tiny-cpu. A `trainjob`
# recipe's GPUs are requested by its TrainJob; the task then only submits and waits.
LOCAL_CPU = "2"
LOCAL_MEMORY = "8G"


@dsl.pipeline(
    name="script-finetune",
    description="LoRA fine-tune the script model with DeepSpeed from a recipe in "
    "training/llm/configs (in the task, or as a Kubeflow Trainer TrainJob of num_nodes x "
    "devices GPUs), register it in MLflow as `script` and gate it on validation bits per byte.",
)
def script_finetune(config: str = "training/llm/configs/tiny-cpu.yaml") -> dict:
    """Parameters are the launch form in the KFP UI.

    config: the recipe, relative to the platform image's working directory
        (`training/llm/configs/a100x16.yaml` for 2 nodes x 8 A100).

    Returns the fine-tuning summary (local) or the TrainJob's name and final status.
    """
    task = finetune_script(config=config)
    task.set_cpu_request(LOCAL_CPU).set_memory_request(LOCAL_MEMORY)
    # Each run trains and registers a new version: a cached result would skip both.
    task.set_caching_options(False)
    return task.output
