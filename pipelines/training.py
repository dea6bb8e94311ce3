"""The training pipeline: ingest -> features -> train -> evaluate -> register -> gate."""

from kfp import dsl

from components.training import build_features, evaluate, ingest, promotion_gate, register, train


@dsl.pipeline(
    name="training",
    description="Train the trend forecaster from Feast features, register it in MLflow as "
    "challenger and promote it to champion when it beats the current one.",
)
def training(
    model_name: str = "trend",
    max_series: int = 24,
    window_hours: int = 720,
    horizon: int = 48,
    seasonality_mode: str = "multiplicative",
    changepoint_prior_scale: float = 0.05,
    promotion_margin: float = 0.0,
) -> dict:
    """Parameters are the launch form in the KFP UI.

    model_name: registered model to train into (serving loads `models:/<name>@champion`).
    max_series: how many topic series to train on (the data budget of a run).
    window_hours: hours of history per series retrieved from Feast (the data window).
    horizon: forecast hours; the last `horizon` hours of the window are held out.
    promotion_margin: sMAPE points the challenger must gain over the champion.
    """
    raw = ingest(max_series=max_series)
    frame = build_features(
        series=raw.outputs["series"], videos=raw.outputs["videos"], window_hours=window_hours
    )
    fitted = train(
        training_frame=frame.outputs["training_frame"],
        horizon=horizon,
        seasonality_mode=seasonality_mode,
        changepoint_prior_scale=changepoint_prior_scale,
    )
    scored = evaluate(
        model=fitted.outputs["model"],
        training_frame=frame.outputs["training_frame"],
        horizon=horizon,
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
        horizon=horizon,
        scores=scored.outputs["Output"],
        margin=promotion_margin,
    )
    return gate.output
