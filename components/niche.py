"""Components of the niche AutoML pipeline: the global stage, then one task per niche.
Imports sit inside the functions because KFP ships each function's source alone."""

from kfp.dsl import Dataset, Input, Output

from components import platform_component


@platform_component
def global_study(budget_minutes: float, niches: str, split: Output[Dataset]) -> list:
    """Returns one work item per niche: {niche, study_seconds, global_version}; `split` holds
    the rows every study searches on."""
    from pathlib import Path

    from contentml.names import comma_list
    from contentml.settings import Settings
    from training.niche.automl import prepare_split, save_split, search_global

    settings = Settings.from_env()
    prepared = prepare_split(settings)
    save_split(prepared, Path(split.path))
    names = comma_list(niches) or None
    result = search_global(settings, prepared, budget_minutes, names)
    return [
        {
            "niche": name,
            "study_seconds": result["study_seconds"],
            "global_version": result["global"]["version"],
        }
        for name in result["niches"]
    ]


@platform_component
def niche_study(
    niche: str, study_seconds: float, global_version: str, split: Input[Dataset]
) -> dict:
    from pathlib import Path

    from contentml.settings import Settings
    from training.niche.automl import load_split, search_niche

    split_rows = load_split(Path(split.path))
    return search_niche(Settings.from_env(), split_rows, niche, study_seconds, global_version)
