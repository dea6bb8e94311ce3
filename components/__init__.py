"""KFP components: thin wiring around the pipelines' stage functions (`training.<family>.steps`,
`training.register`); no logic lives here."""

from collections.abc import Callable

from kfp import dsl
from kfp.dsl.python_component import PythonComponent

from contentml.settings import Settings

# Resolved when the pipeline is compiled: the cluster runs every stage in the platform image.
PLATFORM_IMAGE = Settings.from_env().platform_image


def platform_component(function: Callable) -> PythonComponent:
    """A stage run in the platform image. The image has the pinned kfp already, so the task
    starts without KFP's default `pip install kfp` (seconds per task, in kfp.local too)."""
    return dsl.component(function, base_image=PLATFORM_IMAGE, install_kfp_package=False)
