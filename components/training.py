"""Components of the training pipeline, one per stage, each calling one function of
`training.trend.steps` (`register`: `training.register`). Imports sit inside the functions
because KFP ships each function's source alone."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import platform_component


@platform_component
def ingest(max_series: int, series: Output[Dataset], videos: Output[Dataset]):
    from pathlib import Path

    from contentml.settings import Settings
    from training.trend import steps

    counts = steps.ingest(Settings.from_env(), max_series, Path(series.path), Path(videos.path))
    series.metadata.update(counts)


@platform_component
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


@platform_component
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


@platform_component
def evaluate(
    model: Input[Model], training_frame: Input[Dataset], workers: int, metrics: Output[Metrics]
) -> dict:
    from pathlib import Path

    from training.trend import steps

    scores = steps.evaluate_trend(model.path, Path(training_frame.path), workers)
    for name, value in scores.items():
        metrics.log_metric(name, value)
    return scores


@platform_component
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


@platform_component
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
