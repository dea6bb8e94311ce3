"""The training pipeline: ingest -> features -> train -> evaluate -> register -> gate."""

from kfp import dsl

from components.training import build_features, evaluate, ingest, promotion_gate, register, train
from pipelines.platform import on_cluster
from training.trend.ensemble import DEFAULT_MEMBERS as ENSEMBLE_MEMBERS

DEFAULT_MEMBERS = ",".join(member.value for member in ENSEMBLE_MEMBERS)


@dsl.pipeline(
    name="training",
    description="Train the trend ensemble from Feast features, register it in MLflow as "
    "challenger and promote it to champion when it beats the current one on OWA.",
)
def training(
    model_name: str = "trend",
    max_series: int = 24,
    window_hours: int = 720,
    horizon: int = 48,
    members: str = DEFAULT_MEMBERS,
    validation_origins: int = 2,
    workers: int = 2,
    promotion_margin: float = 0.0,
) -> dict:
    """Parameters are the launch form in the KFP UI.

    model_name: registered model to train into (serving loads `models:/<name>@champion`).
    max_series: how many topic series to train on (the data budget of a run).
    window_hours: hours of history per series retrieved from Feast (the data window).
    horizon: forecast hours; the last `horizon` hours of the window are held out.
    members: forecasters the ensemble combines, comma-separated (see `Member`).
    validation_origins: held-out horizons the ensemble's weights and intervals are chosen on.
    workers: processes fitting the per-series forecasters.
    promotion_margin: OWA the challenger must gain over the champion.
    """
    raw = ingest(max_series=max_series)
    frame = build_features(
        series=raw.outputs["series"], videos=raw.outputs["videos"], window_hours=window_hours
    )
    fitted = train(
        training_frame=frame.outputs["training_frame"],
        horizon=horizon,
        members=members,
        validation_origins=validation_origins,
        workers=workers,
    )
    scored = evaluate(
        model=fitted.outputs["model"],
        training_frame=frame.outputs["training_frame"],
        workers=workers,
    )
    version = register(
        model_name=model_name,
        model=fitted.outputs["model"],
        training_frame=frame.outputs["training_frame"],
        scores=scored.outputs["Output"],
        run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    )
    gate = promotion_gate(
        model_name=model_name,
        version=version.output,
        training_frame=frame.outputs["training_frame"],
        workers=workers,
        scores=scored.outputs["Output"],
        margin=promotion_margin,
    )
    on_cluster(raw, frame, fitted, scored, version, gate)
    return gate.output
