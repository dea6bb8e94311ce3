"""The daily optimization pipeline: the day's outcomes update the channel-settings studies,
then each study publishes the settings to put live tomorrow."""

from kfp import dsl

from components.optimization import publish_settings, tell_outcomes
from pipelines.platform import on_cluster


@dsl.pipeline(
    name="optimization",
    description="Bayesian optimization of channel settings (upload hour, video length, title "
    "length, cadence): tell each running trial the outcome its settings had (GP sampler, "
    "Optuna storage), then publish each study's next settings as JSON.",
)
def optimization(outcomes_path: str, studies: str = "") -> dict:
    """Parameters are the launch form in the KFP UI.

    outcomes_path: CSV or parquet of the day's outcomes: `study`, `trial`, `value` (the
        channel's mean RPM over the day the trial's settings were live).
    studies: comma-separated studies to publish settings for (a new name starts a study);
        empty for every study the outcomes name.

    Returns {study: {"trial", "params"}}, also written as the `next_settings` artifact.
    """
    told = tell_outcomes(outcomes_path=outcomes_path)
    # Every run reads the file and the studies as they are now: a cached result would skip them.
    told.set_caching_options(False)
    published = publish_settings(studies=studies, outcome_studies=told.outputs["studies"])
    published.set_caching_options(False)
    on_cluster(told, published)
    return published.outputs["Output"]
