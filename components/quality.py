"""Components of the quality pipeline, one per stage, each calling one `training.quality.steps`
function. Imports sit inside the functions because KFP ships each function's source alone."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import platform_component


@platform_component
def ingest_toxicity(data_path: str, frame: Output[Dataset]):
    from pathlib import Path

    from contentml.settings import Settings
    from training.quality import steps

    settings = Settings.from_env()
    path = Path(data_path) if data_path else settings.data_dir / "toxicity/train.csv"
    frame.metadata.update(steps.ingest_toxicity(path, Path(frame.path), settings))


@platform_component
def train_quality(
    frame: Input[Dataset],
    epochs: int,
    learning_rate: float,
    max_train_rows: int,
    folds: int,
    model: Output[Model],
):
    from pathlib import Path

    from training.quality import steps
    from training.quality.config import QualityConfig

    config = QualityConfig(
        epochs=epochs,
        learning_rate=learning_rate,
        max_train_rows=max_train_rows or None,
        folds=folds,
    )
    model.metadata.update(steps.train_quality(Path(frame.path), Path(model.path), config))


@platform_component
def evaluate_quality(model: Input[Model], frame: Input[Dataset], metrics: Output[Metrics]) -> dict:
    from pathlib import Path

    from training.quality import steps

    scores = steps.evaluate_quality(model.path, Path(frame.path))
    for name, value in scores.items():
        metrics.log_metric(name, value)
    return scores


@platform_component
def quality_gate(
    model_name: str, version: str, frame: Input[Dataset], scores: dict, margin: float
) -> dict:
    from dataclasses import asdict
    from pathlib import Path

    from contentml.settings import Settings
    from training.quality import steps

    decision = steps.promotion_gate(
        Settings.from_env(), model_name, version, Path(frame.path), scores, margin
    )
    return asdict(decision)
