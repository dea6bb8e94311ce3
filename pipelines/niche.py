"""The niche AutoML pipeline: the global study, then every niche's study in parallel."""

from kfp import dsl

from components.niche import global_study, niche_study
from pipelines.platform import on_cluster

PARALLELISM = 2
"""Niche studies running at once. KFP fixes it when the pipeline compiles: raise it (and
recompile) where the cluster has the cores."""


@dsl.pipeline(
    name="niche-automl",
    description="Search the global engagement model, then a model per niche warm-started "
    "from the global study's best trials; register each as niche-<slug> and gate it.",
)
def niche_automl(budget_minutes: float = 10.0, niches: str = "") -> list:
    """Parameters are the launch form in the KFP UI.

    budget_minutes: wall clock for all studies together (split evenly over the global study
        and the niches; niche studies run `PARALLELISM` at a time).
    niches: comma-separated niche names or slugs; empty for every niche with enough data.

    Returns every niche's result: best family, validation and global RMSE, version, gate.
    """
    work = global_study(budget_minutes=budget_minutes, niches=niches)
    with dsl.ParallelFor(items=work.outputs["Output"], parallelism=PARALLELISM) as item:
        found = niche_study(
            niche=item.niche,
            study_seconds=item.study_seconds,
            global_version=item.global_version,
            split=work.outputs["split"],
        )
    on_cluster(work, found)
    return dsl.Collected(found.output)
