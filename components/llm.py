"""Components of the script model's pipeline. Imports sit inside the functions because KFP
ships each function's source alone."""

from components import platform_component


@platform_component
def finetune_script(config: str, max_steps: int = 0) -> dict:
    """Runs the recipe at `config` (relative to the image's working directory) in this task, or
    submits it as a TrainJob and waits, as the recipe's `launcher` says; `max_steps` above 0
    replaces the recipe's."""
    from pathlib import Path

    from contentml.settings import Settings
    from training.llm.trainjob import launch

    return launch(Settings.from_env(), Path(config), max_steps or None)
