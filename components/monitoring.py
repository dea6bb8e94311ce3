"""Components of the monitoring pipeline: the drift check, then the retraining trigger. Imports
sit inside the functions because KFP ships each function's source alone."""

from typing import NamedTuple

from kfp.dsl import Metrics, Output

from components import platform_component


@platform_component
def drift_check(
    model: str, reference_path: str, current_path: str, metrics: Output[Metrics]
) -> NamedTuple("Drift", drift_share=float, drifted=bool, run_id=str, report=str):
    """Evidently's check of the model's inputs; logs its own MLflow run and HTML report."""
    from collections import namedtuple
    from pathlib import Path

    from contentml.settings import Settings
    from monitoring.drift import run_drift_check

    result = run_drift_check(Settings.from_env(), Path(reference_path), Path(current_path), model)
    metrics.log_metric("drift_share", result["drift_share"])
    metrics.log_metric("drifted", float(result["drifted"]))
    drift = namedtuple("Drift", ["drift_share", "drifted", "run_id", "report"])
    return drift(result["drift_share"], result["drifted"], result["run_id"], result["report"])


@platform_component
def retrain_trigger(
    model: str,
    window_id: str,
    current_path: str,
    drift_share: float,
    current_metric: str,
    drift_run_id: str,
) -> dict:
    """Launches the model's training pipeline when a threshold is crossed, once per window."""
    from pathlib import Path

    from contentml.launch import launch_pipeline
    from contentml.settings import Settings
    from monitoring.retrain import check_window

    return check_window(
        Settings.from_env(),
        model,
        window_id,
        Path(current_path),
        drift_share,
        float(current_metric) if current_metric else None,
        drift_run_id,
        launch=launch_pipeline,
    )
