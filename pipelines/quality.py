"""The quality pipeline: ingest -> train -> evaluate -> register -> gate."""

from kfp import dsl

from components.quality import evaluate_quality, ingest_toxicity, quality_gate, train_quality
from components.training import register
from pipelines.platform import on_cluster
from training.quality.config import QualityConfig

DEFAULTS = QualityConfig()


@dsl.pipeline(
    name="quality-training",
    description="Fine-tune the MiniLM quality classifier on the labelled toxicity tweets, "
    "register it in MLflow as challenger and promote it to champion when its weighted F1 on "
    "the fixed evaluation slice beats the current one.",
)
def quality_training(
    model_name: str = "quality",
    data_path: str = "",
    epochs: int = DEFAULTS.epochs,
    learning_rate: float = DEFAULTS.learning_rate,
    max_train_rows: int = 0,
    folds: int = DEFAULTS.folds,
    promotion_margin: float = 0.0,
) -> dict:
    """Parameters are the launch form in the KFP UI.

    model_name: registered model to train into (serving loads `models:/<name>@champion`).
    data_path: labelled CSV (id, class, tweet); empty for `toxicity/train.csv` in the data dir.
    epochs: passes over the training split; the best epoch on validation is kept.
    learning_rate: peak AdamW learning rate.
    max_train_rows: train on at most this many rows (0: all), for quick runs.
    folds: cross-fitting folds (at least 2), one encoder each; time grows with folds - 1.
    promotion_margin: weighted F1 the challenger must gain over the champion.
    """
    data = ingest_toxicity(data_path=data_path)
    fitted = train_quality(
        frame=data.outputs["frame"],
        epochs=epochs,
        learning_rate=learning_rate,
        max_train_rows=max_train_rows,
        folds=folds,
    )
    scored = evaluate_quality(model=fitted.outputs["model"], frame=data.outputs["frame"])
    version = register(
        model_name=model_name,
        model=fitted.outputs["model"],
        training_frame=data.outputs["frame"],
        scores=scored.outputs["Output"],
        run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        family="quality",
    )
    gate = quality_gate(
        model_name=model_name,
        version=version.output,
        frame=data.outputs["frame"],
        scores=scored.outputs["Output"],
        margin=promotion_margin,
    )
    on_cluster(data, fitted, scored, version, gate)
    return gate.output
