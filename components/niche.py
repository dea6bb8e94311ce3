"""Components of the niche AutoML pipeline: the global stage, then one task per niche.
Imports sit inside the functions because KFP ships each function's source alone."""

from kfp import dsl

from components.training import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def global_study(budget_minutes: float, niches: str) -> list:
    """Returns one work item per niche: {niche, study_seconds, global_version}."""
    from contentml.settings import Settings
    from training.niche.automl import search_global

    names = [n.strip() for n in niches.split(",") if n.strip()] or None
    result = search_global(Settings.from_env(), budget_minutes, names)
    return [
        {
            "niche": name,
            "study_seconds": result["study_seconds"],
            "global_version": result["global"]["version"],
        }
        for name in result["niches"]
    ]


@dsl.component(base_image=PLATFORM_IMAGE)
def niche_study(niche: str, study_seconds: float, global_version: str) -> dict:
    from contentml.settings import Settings
    from training.niche.automl import search_niche

    return search_niche(Settings.from_env(), niche, study_seconds, global_version)
