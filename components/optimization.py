"""Components of the daily optimization pipeline: tell the day's outcomes, then publish the next
settings. Imports sit inside the functions because KFP ships each function's source alone."""

from typing import NamedTuple

from kfp.dsl import Artifact, Output

from components import platform_component


@platform_component
def tell_outcomes(
    outcomes_path: str,
) -> NamedTuple("Told", told=int, already_finished=int, studies=list):
    """Each running trial gets its outcome from the CSV or parquet file; returns the counts and
    the studies the file names."""
    from collections import namedtuple
    from pathlib import Path

    from contentml.settings import Settings
    from training.revenue.channel_settings import apply_outcomes, read_outcomes

    result = apply_outcomes(Settings.from_env(), read_outcomes(Path(outcomes_path)))
    told = namedtuple("Told", ["told", "already_finished", "studies"])
    return told(result["told"], result["already_finished"], result["studies"])


@platform_component
def publish_settings(studies: str, outcome_studies: list, next_settings: Output[Artifact]) -> dict:
    """The next settings of each study in `studies` (comma-separated; empty: those the day's
    outcomes named), as the JSON artifact the content pipeline applies and as the output."""
    from pathlib import Path

    from contentml.names import comma_list
    from contentml.settings import Settings
    from training.revenue.channel_settings import publish_next

    names = comma_list(studies) or outcome_studies
    published = publish_next(Settings.from_env(), names, Path(next_settings.path))
    next_settings.metadata["studies"] = len(published)
    return published
