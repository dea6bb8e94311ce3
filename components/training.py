"""Components of the training pipeline, one per stage, each calling one function of
`training.trend.steps` (`register`: `training.register`). Imports sit inside the functions
because KFP ships each function's source alone."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from contentml.settings import Settings

# Resolved when the pipeline is compiled: the cluster runs every stage in the platform image.
PLATFORM_IMAGE = Settings.from_env().platform_image


@dsl.component(base_image=PLATFORM_IMAGE)
def ingest(max_series: int, series: Output[Dataset], videos: Output[Dataset]):
    from pathlib import Path

    from contentml.settings import Settings
    from training.trend import steps

    counts = steps.ingest(Settings.from_env(), max_series, Path(series.path), Path(videos.path))
    series.metadata.update(counts)


@dsl.component(base_image=PLATFORM_IMAGE)
def build_features(
    series: Input[Dataset],
    videos: Input[Dataset],
    window_hours: int,
    training_frame: Output[Dataset],
):
    from pathlib import Path

    from contentml.settings import Settings
    from training.trend import steps

    counts = steps.build_features(
        Settings.from_env(),
        Path(series.path),
        Path(videos.path),
        window_hours,
        Path(training_frame.path),
    )
    training_frame.metadata.update(counts)


@dsl.component(base_image=PLATFORM_IMAGE)
def train(
    training_frame: Input[Dataset],
    horizon: int,
    members: str,
    validation_origins: int,
    workers: int,
    model: Output[Model],
):
    from pathlib import Path

    from training.trend import steps

    config = steps.ensemble_config(horizon, members, validation_origins)
    params = steps.train_trend(Path(training_frame.path), Path(model.path), config, workers)
    model.metadata.update(params)


@dsl.component(base_image=PLATFORM_IMAGE)
def evaluate(
    model: Input[Model], training_frame: Input[Dataset], workers: int, metrics: Output[Metrics]
) -> dict:
    from pathlib import Path

    from training.trend import steps

    scores = steps.evaluate_trend(model.path, Path(training_frame.path), workers)
    for name, value in scores.items():
        metrics.log_metric(name, value)
    return scores


@dsl.component(base_image=PLATFORM_IMAGE)
def register(
    model_name: str,
    model: Input[Model],
    training_frame: Input[Dataset],
    scores: dict,
    run_name: str,
    family: str = "trend",
) -> str:
    from pathlib import Path

    from contentml.settings import Settings
    from training.register import register

    params = {**training_frame.metadata, **model.metadata}
    return register(
        Settings.from_env(), model_name, Path(model.path), params, scores, run_name, family
    )


@dsl.component(base_image=PLATFORM_IMAGE)
def promotion_gate(
    model_name: str,
    version: str,
    training_frame: Input[Dataset],
    workers: int,
    scores: dict,
    margin: float,
) -> dict:
    from dataclasses import asdict
    from pathlib import Path

    from contentml.settings import Settings
    from training.trend import steps

    decision = steps.promotion_gate(
        Settings.from_env(), model_name, version, Path(training_frame.path), workers, scores, margin
    )
    return asdict(decision)
