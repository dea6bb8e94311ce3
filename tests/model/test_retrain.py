"""The retraining trigger (`monitoring/retrain.py`): thresholds, one launch per drifted window (also
from concurrent threads and processes), durable records in MLflow, real drift from files, the
cluster schedule's arguments, and the monitoring pipeline in kfp.local."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contentml import events, launch, registry
from contentml.settings import Settings
from entrypoints import runner
from feature_repo.niche_schema import FEATURES
from monitoring import retrain
from monitoring.drift import run_drift_check
from monitoring.retrain import (
    RETRAINING,
    Decision,
    LaunchFailed,
    Outcome,
    TriggerConfig,
    TriggerError,
    check_window,
    decide,
    maybe_retrain,
    trigger_records,
)
from tests.conftest import DATA_DIR, make_settings
from tests.helpers.events import published
from training.data import load_youtube_trending
from training.niche.data import engagement_frame


class FakeLaunch:
    """Counts launches (thread-safe); `seconds` is how long a launch takes."""

    def __init__(self, seconds: float = 0.0, error: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.seconds, self.error = seconds, error
        self._lock = threading.Lock()

    def __call__(self, settings: Settings, name: str, arguments: dict[str, Any]) -> str:
        with self._lock:
            self.calls.append((name, arguments))
            number = len(self.calls)
        time.sleep(self.seconds)
        if self.error is not None:
            raise self.error
        return f"fake-run-{number}"


@pytest.mark.parametrize(
    ("share", "drop", "retrain_", "reasons"),
    [
        (0.10, None, False, 0),  # exactly 10 %: not more than 10 %
        (2 / 20, 0.0, False, 0),  # 2 of 20 features, as the drift check computes it
        (0.105, None, True, 1),
        (0.0, 0.05, False, 0),  # exactly 5 % worse
        (0.0, 0.06, True, 1),
        (0.0, -0.2, False, 0),  # better than at registration
        (0.3, 0.2, True, 2),
    ],
)
def test_decide_retrains_above_the_thresholds_only(share, drop, retrain_, reasons):
    decision = decide(share, drop)
    assert decision.retrain is retrain_ and len(decision.reasons) == reasons


def test_decide_names_the_thresholds_and_takes_a_config():
    assert decide(0.25, 0.08).reasons == (
        "drift share 25.0% > 10%",
        "performance drop 8.0% > 5%",
    )
    assert decide(0.25, None, TriggerConfig(drift_share=0.3)) == Decision(False, ())


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda: TriggerConfig(drift_share=1.0), "drift_share must be in"),
        (lambda: TriggerConfig(performance_drop=-0.1), "performance_drop must be >= 0"),
        (lambda: decide(1.5, None), "drift share must be in"),
        (lambda: decide(0.2, float("nan")), "performance drop must be a number"),
    ],
)
def test_bad_thresholds_and_values_are_named(call, problem):
    with pytest.raises(TriggerError, match=problem):
        call()


@pytest.mark.parametrize(
    ("model", "pipeline", "arguments"),
    [
        ("trend", "training", {"model_name": "trend"}),
        ("quality", "quality-training", {"model_name": "quality"}),
        ("niche-music", "niche-automl", {"niches": "music"}),
        ("niche-global", "niche-automl", {"niches": ""}),
        ("script", "script-finetune", {}),
    ],
)
def test_each_family_retrains_with_its_pipeline(model, pipeline, arguments):
    assert retrain.retraining(model) == (pipeline, arguments)


def test_the_table_names_real_pipelines_and_their_inputs():
    for plan in RETRAINING.values():
        inputs = runner.pipeline(plan.pipeline).component_spec.inputs or {}
        assert set(plan.arguments("niche-music")) <= set(inputs)
    with pytest.raises(TriggerError, match="no training pipeline known for model 'prophet'"):
        retrain.retraining("prophet")


def test_a_drifted_window_fires_once_and_a_new_window_again(settings):
    launch = FakeLaunch()
    first = maybe_retrain(settings, "niche-music", "2024-05-01T10", 0.2, launch=launch)
    again = maybe_retrain(settings, "niche-music", "2024-05-01T10", 0.25, 0.1, launch=launch)
    assert launch.calls == [("niche-automl", {"niches": "music"})]
    assert again == first
    assert first.outcome is Outcome.LAUNCHED and first.pipeline_run == "fake-run-1"
    assert first.reasons == ("drift share 20.0% > 10%",) and first.performance_drop is None

    other = maybe_retrain(settings, "niche-music", "2024-05-01T11", 0.0, 0.07, launch=launch)
    assert len(launch.calls) == 2 and other.record_id != first.record_id
    # The same window of another model is its own trigger.
    maybe_retrain(settings, "quality", "2024-05-01T10", 0.2, launch=launch)
    assert launch.calls[-1] == ("quality-training", {"model_name": "quality"})
    assert [r.window_id for r in trigger_records(settings, "niche-music")] == [
        "2024-05-01T10",
        "2024-05-01T11",
    ]


def test_no_threshold_crossed_launches_and_records_nothing(settings):
    launch = FakeLaunch()
    assert maybe_retrain(settings, "trend", "w1", 0.1, 0.05, launch=launch) is None
    assert launch.calls == [] and trigger_records(settings) == []


def test_the_record_is_in_mlflow_for_the_ui(settings):
    record = maybe_retrain(
        settings, "trend", "w1", 0.15, 0.02, launch=FakeLaunch(), drift_run_id="abc"
    )
    client = registry.connect(settings)
    run = client.get_run(record.record_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "contentml-monitoring"
    assert run.info.status == "FINISHED" and run.info.run_name == "retrain-trend-w1"
    assert run.data.tags["contentml.trigger.window"] == "w1"
    assert run.data.tags["contentml.trigger.drift_run"] == "abc"
    assert run.data.metrics == {"drift_share": 0.15, "performance_drop": 0.02}
    assert record.to_dict()["arguments"] == {"model_name": "trend"}
    json.dumps(record.to_dict())  # JSON-ready for the CLI


def concurrently(threads: int, call) -> list:
    """`call()` in `threads` threads released together; their results."""
    start = threading.Barrier(threads)
    results = []

    def run():
        start.wait()
        results.append(call())

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def test_concurrent_threads_launch_once_and_return_the_same_record(settings):
    launch = FakeLaunch(seconds=0.5)
    results = concurrently(
        4, lambda: maybe_retrain(settings, "niche-music", "w1", 0.3, launch=launch)
    )
    assert len(launch.calls) == 1
    assert len(results) == 4 and len({r.record_id for r in results}) == 1
    assert len(trigger_records(settings)) == 1


def test_without_a_lock_the_earliest_claim_launches(settings, monkeypatch):
    """The `http(s)://` tracking-server path: claim, settle, the earliest claim wins."""
    monkeypatch.setitem(registry.ALIAS_LOCKS, "sqlite", lambda uri, name: contextlib.nullcontext())
    monkeypatch.setattr(retrain, "EXCLUSIVE_SCHEMES", frozenset())
    monkeypatch.setattr(retrain, "SETTLE_SECONDS", 1.0)
    launch = FakeLaunch()
    results = concurrently(3, lambda: maybe_retrain(settings, "trend", "w1", 0.3, launch=launch))
    assert len(launch.calls) == 1
    (record,) = trigger_records(settings)  # the losers deleted their claims
    assert {r.record_id for r in results} == {record.record_id}


def _process_monitor(home: str, calls: str, start, results) -> None:
    """One monitor process: waits for the others, then checks the same window."""

    def launch(settings, name, arguments):
        with open(calls, "a") as file:
            file.write(f"{name}\n")
        time.sleep(1.0)
        return "fake-run"

    settings = make_settings(Path(home))
    start.wait()
    record = maybe_retrain(settings, "niche-music", "w1", 0.3, launch=launch)
    results.put(record.to_dict())


@pytest.mark.slow
def test_concurrent_processes_launch_once_and_the_record_survives_a_restart(tmp_path):
    """Two monitor processes at once; then this process (a restart) reads the record."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(3), context.Queue()
    home, calls = tmp_path / "state", tmp_path / "calls.txt"
    # The monitors share an existing MLflow database, as in production: two processes creating
    # a fresh SQLite schema at once collide in MLflow's migrations, not in the trigger.
    assert trigger_records(make_settings(home)) == []
    processes = [
        context.Process(target=_process_monitor, args=(str(home), str(calls), start, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    # A spawned process imports this module first: minutes on a busy 2-core machine.
    start.wait(timeout=300)
    returned = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert calls.read_text() == "niche-automl\n"
    assert returned[0]["record_id"] == returned[1]["record_id"]

    (record,) = trigger_records(make_settings(home))
    assert record.to_dict() in returned and record.outcome is Outcome.LAUNCHED
    assert record.pipeline_run == "fake-run" and record.drift_share == 0.3


def test_a_failed_launch_is_recorded_and_retried(settings):
    with pytest.raises(LaunchFailed, match="niche-automl.*did not launch: no KFP") as raised:
        maybe_retrain(
            settings, "niche-music", "w1", 0.3, launch=FakeLaunch(error=OSError("no KFP"))
        )
    assert isinstance(raised.value.__cause__, OSError)
    (failed,) = trigger_records(settings)
    assert failed.outcome is Outcome.FAILED

    launch = FakeLaunch()
    retried = maybe_retrain(settings, "niche-music", "w1", 0.3, launch=launch)
    assert len(launch.calls) == 1 and retried.outcome is Outcome.LAUNCHED
    assert [r.outcome for r in trigger_records(settings)] == [Outcome.FAILED, Outcome.LAUNCHED]


@pytest.mark.parametrize(("model", "window"), [("trend", "it's"), ("trend", ""), ("a'b", "w")])
def test_names_that_could_break_the_search_are_refused(settings, model, window):
    with pytest.raises(TriggerError):
        maybe_retrain(settings, model, window, 0.3, launch=FakeLaunch())


def test_the_projects_launcher_runs_locally_or_submits_the_compiled_package(settings, monkeypatch):
    seen = []
    monkeypatch.setattr(launch, "start_local", lambda s, n, a: seen.append("local") or "pid 1")

    def submitted(settings, package, arguments):
        seen.append(package)
        return "run-7"

    monkeypatch.setattr(launch, "submit_package", submitted)
    assert launch.launch_pipeline(settings, "training", {}) == "pid 1"
    cluster = make_settings(settings.home, KFP_HOST="http://kfp.example")
    assert launch.launch_pipeline(cluster, "training", {}) == "run-7"
    assert seen == ["local", launch.COMPILED_DIR / "training.yaml"]
    with pytest.raises(launch.PipelineError, match="unknown pipeline 'nope'"):
        launch.launch_pipeline(cluster, "nope", {})


@pytest.fixture(scope="module")
def windows(tmp_path_factory) -> Path:
    """reference.parquet, current.parquet (same population) and shifted.parquet (a fifth of the
    features moved by half a standard deviation) from the real engagement features."""
    features = engagement_frame(load_youtube_trending(DATA_DIR))[list(FEATURES)]
    order = np.random.default_rng(3).permutation(len(features))[:2000]
    reference, current = features.iloc[order[:1000]], features.iloc[order[1000:]].copy()
    shifted = current.copy()
    for column in list(FEATURES)[::5]:
        shifted[column] = shifted[column] + 0.5 * reference[column].std()
    folder = tmp_path_factory.mktemp("windows")
    for name, frame in (("reference", reference), ("current", current), ("shifted", shifted)):
        frame.reset_index(drop=True).to_parquet(folder / f"{name}.parquet")
    return folder


def test_real_drift_from_files_launches_once(settings, windows):
    launch = FakeLaunch()
    steady = run_drift_check(
        settings, windows / "reference.parquet", windows / "current.parquet", "niche-music"
    )
    assert not steady["drifted"]
    calm = check_window(
        settings, "niche-music", "", windows / "current.parquet", steady["drift_share"],
        launch=launch,
    )  # fmt: skip
    assert calm["retrain"] is False and calm["trigger"] is None and launch.calls == []

    drift = run_drift_check(
        settings, windows / "reference.parquet", windows / "shifted.parquet", "niche-music"
    )
    assert drift["drifted"] and drift["drift_share"] >= 0.2
    for _ in range(2):  # the next scheduled check of the same file
        result = check_window(
            settings, "niche-music", "", windows / "shifted.parquet", drift["drift_share"],
            drift_run_id=drift["run_id"], launch=launch,
        )  # fmt: skip
        assert result["retrain"] is True
    assert launch.calls == [("niche-automl", {"niches": "music"})]
    assert result["window_id"] == retrain.window_of(windows / "shifted.parquet")
    assert result["trigger"]["drift_run_id"] == drift["run_id"]


def register_champion(settings: Settings, model: str, metric: str, value: float) -> None:
    """A registered champion whose training run logged `metric` (no artifacts needed)."""
    client = registry.connect(settings)
    run = client.create_run(registry.experiment_id(client, settings))
    client.log_metric(run.info.run_id, metric, value)
    client.create_registered_model(model)
    version = client.create_model_version(model, "file:///nowhere", run.info.run_id)
    client.set_registered_model_alias(model, "champion", version.version)


def test_a_metric_worse_than_the_champions_by_more_than_5_percent_launches(settings, windows):
    """The window's RMSE against the niche champion's validation RMSE at registration."""
    register_champion(settings, "niche-music", "validation_rmse", 1.0)
    events.configure(settings)
    launch = FakeLaunch()
    current = windows / "current.parquet"
    calm = check_window(settings, "niche-music", "w1", current, 0.0, 1.03125, launch=launch)
    assert calm["performance_drop"] == 0.03125 and not calm["retrain"]
    worse = check_window(settings, "niche-music", "w2", current, 0.0, 1.0625, launch=launch)
    assert worse["reasons"] == ["performance drop 6.2% > 5%"] and len(launch.calls) == 1
    better = check_window(settings, "niche-music", "w3", current, 0.0, 0.5, launch=launch)
    assert better["performance_drop"] == -0.5 and len(launch.calls) == 1
    alerts = [e.data for e in published(settings) if e.kind == "alert.performance"]
    assert alerts == [{"model": "niche-music", "drop": 0.0625, "threshold": 0.05}]  # w2 only
    with pytest.raises(TriggerError, match="'niche-comedy' has no champion"):
        check_window(settings, "niche-comedy", "w1", current, 0.0, 1.0, launch=launch)


class FakeKfpClient:
    def __init__(self):
        self.calls = []

    def create_experiment(self, name):
        self.calls.append(("create_experiment", name))
        return type("Experiment", (), {"experiment_id": "exp-1"})

    def list_recurring_runs(self, experiment_id, page_size):
        self.calls.append(("list_recurring_runs", experiment_id))
        old = type("RecurringRun", (), {"display_name": "monitoring-niche-music"})
        old.recurring_run_id = "rr-0"
        return type("Listing", (), {"recurring_runs": [old]})

    def delete_recurring_run(self, recurring_run_id):
        self.calls.append(("delete_recurring_run", recurring_run_id))

    def create_recurring_run(self, **kwargs):
        kwargs["package"] = Path(kwargs["pipeline_package_path"]).read_text()
        self.calls.append(("create_recurring_run", kwargs))
        return type("RecurringRun", (), {"recurring_run_id": "rr-1"})


def test_schedule_monitoring_creates_an_hourly_recurring_run(settings):
    client = FakeKfpClient()
    run_id = runner.schedule_monitoring(
        settings, "niche-music", "/data/reference.parquet", "/data/current.parquet", client=client
    )
    assert run_id == "rr-1"
    (_, experiment), listed, replaced, (_, kwargs) = client.calls
    assert experiment == "contentml-monitoring"
    # KFP cannot update a recurring run: the one of the same name is replaced.
    assert listed == ("list_recurring_runs", "exp-1")
    assert replaced == ("delete_recurring_run", "rr-0")
    package = kwargs.pop("package")
    assert package == (runner.COMPILED_DIR / "monitoring.yaml").read_text()
    assert kwargs == {
        "experiment_id": "exp-1",
        "job_name": "monitoring-niche-music",
        "description": "drift check and retraining trigger for niche-music",
        "cron_expression": "0 0 * * * *",
        "max_concurrency": 1,
        "no_catchup": True,
        "params": {
            "model": "niche-music",
            "reference_path": "/data/reference.parquet",
            "current_path": "/data/current.parquet",
            "window_id": "",
            "current_metric": "",
        },
        "pipeline_package_path": kwargs["pipeline_package_path"],
        "enable_caching": False,
        "service_account": "contentml",
    }


def test_schedule_monitoring_names_bad_requests(settings):
    with pytest.raises(TriggerError, match="six fields"):
        runner.schedule_monitoring(settings, "trend", "r", "c", cron="0 * * * *", client=object())
    with pytest.raises(TriggerError, match="set KFP_HOST"):
        runner.schedule_monitoring(settings, "trend", "r", "c")


@pytest.mark.slow
def test_the_monitoring_pipeline_runs_locally(settings, windows):
    """Both tasks in kfp.local: a steady window checks, decides and launches nothing."""
    result = runner.run_local(
        settings,
        "monitoring",
        {
            "model": "niche-music",
            "reference_path": str(windows / "reference.parquet"),
            "current_path": str(windows / "current.parquet"),
            "window_id": "steady-1",
        },
    )
    assert result["retrain"] is False and result["trigger"] is None
    assert result["window_id"] == "steady-1" and result["performance_drop"] is None
    assert trigger_records(settings) == []
    runs = registry.connect(settings).search_runs(
        [registry.experiment_id(registry.connect(settings), settings)],
        filter_string="tags.`contentml.kind` = 'drift'",
    )
    assert len(runs) == 1
