"""The monitoring pipeline: drift check -> retraining trigger. In the cluster it runs as a
recurring run (`monitoring.retrain.schedule_monitoring`)."""

from kfp import dsl

from components.monitoring import drift_check, retrain_trigger
from pipelines.platform import on_cluster


@dsl.pipeline(
    name="monitoring",
    description="Compare a model's current inputs with its reference window (Evidently) and "
    "launch its training pipeline when more than 10 % of the features drifted or its metric "
    "dropped by more than 5 %, once per window; the new version goes through the usual gate.",
)
def monitoring(
    model: str,
    reference_path: str,
    current_path: str,
    window_id: str = "",
    current_metric: str = "",
) -> dict:
    """Parameters are the launch form in the KFP UI.

    model: registered model whose inputs are checked (`quality`, `niche-<slug>`).
    reference_path: CSV or parquet of the reference window (the training data).
    current_path: CSV or parquet of the current window (logged requests).
    window_id: the window's name; a window triggers at most one retraining. Empty: the current
        file's content, so a scheduled run over unchanged data does not fire again.
    current_metric: the model's metric on the window with ground truth (sMAPE for trend,
        weighted F1 for quality, RMSE for niche models, as `monitoring.performance` scores it),
        compared with the champion's at registration; empty when there is no ground truth yet.

    Returns the decision, its reasons and the trigger record (None without a retraining).
    """
    drift = drift_check(model=model, reference_path=reference_path, current_path=current_path)
    # Every run checks the files as they are now: a cached result would skip the check.
    drift.set_caching_options(False)
    trigger = retrain_trigger(
        model=model,
        window_id=window_id,
        current_path=current_path,
        drift_share=drift.outputs["drift_share"],
        current_metric=current_metric,
        drift_run_id=drift.outputs["run_id"],
    )
    trigger.set_caching_options(False)
    on_cluster(drift, trigger)
    return trigger.output
