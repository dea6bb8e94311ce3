"""Pipelines compile to the committed YAML, which KFP's own loader accepts."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from kfp import components

from contentml import pipelines, registry
from contentml.pipelines import PipelineError
from tests.conftest import DATA_DIR, make_settings


def test_compiled_yaml_is_committed_and_current(tmp_path: Path):
    for path in pipelines.compile_all(tmp_path):
        committed = pipelines.COMPILED_DIR / path.name
        assert committed.exists(), f"run `make compile` and commit {committed}"
        assert path.read_text() == committed.read_text(), f"run `make compile`: {path.name}"


def test_kfp_loads_the_compiled_pipeline():
    loaded = components.load_component_from_file(str(pipelines.COMPILED_DIR / "training.yaml"))
    assert loaded.name == "training"
    assert set(loaded.component_spec.inputs) == {
        "model_name",
        "max_series",
        "window_hours",
        "horizon",
        "members",
        "validation_origins",
        "workers",
        "promotion_margin",
    }


def test_arguments_are_typed_from_the_pipeline_inputs():
    arguments = pipelines.parse_arguments(
        "training", ["max_series=3", "promotion_margin=0.1", "model_name=trend"]
    )
    assert arguments == {"max_series": 3, "promotion_margin": 0.1, "model_name": "trend"}


@pytest.mark.parametrize(
    ("name", "pairs", "problem"),
    [
        ("nope", [], "unknown pipeline 'nope'"),
        ("training", ["colour=red"], "bad parameter 'colour=red'"),
        ("training", ["max_series"], "bad parameter 'max_series'"),
        ("training", ["max_series=many"], "max_series needs a int"),
    ],
)
def test_bad_arguments_name_the_problem(name, pairs, problem):
    with pytest.raises(PipelineError, match=problem):
        pipelines.parse_arguments(name, pairs)


def test_kfp_loads_the_compiled_quality_pipeline():
    loaded = components.load_component_from_file(
        str(pipelines.COMPILED_DIR / "quality-training.yaml")
    )
    assert loaded.name == "quality-training"
    assert set(loaded.component_spec.inputs) == {
        "model_name",
        "data_path",
        "epochs",
        "learning_rate",
        "max_train_rows",
        "promotion_margin",
    }


@pytest.mark.slow
def test_quality_pipeline_runs_locally_and_registers_a_champion(tmp_path: Path):
    """The same stages as `contentml quality train`, as KFP tasks in kfp.local."""
    sample = tmp_path / "sample.csv"
    raw = pd.read_csv(DATA_DIR / "toxicity" / "train.csv", dtype=str, keep_default_na=False)
    raw.groupby("class", group_keys=False).sample(n=400, random_state=0).to_csv(sample, index=False)
    settings = make_settings(tmp_path / "state")
    gate = pipelines.run_local(
        settings,
        "quality-training",
        {"data_path": str(sample), "epochs": 1, "max_train_rows": 200, "learning_rate": 3e-4},
    )
    assert gate["promoted"] is True and gate["metric"] == "weighted_f1"
    client = registry.connect(settings)
    assert registry.alias_version(client, "quality", registry.Alias.CHAMPION) == "1"
    run = client.get_run(client.get_model_version("quality", "1").run_id)
    assert run.data.params["epochs"] == "1"
    assert "weighted_f1" in run.data.metrics and "hate_threshold" in run.data.params


def test_kfp_loads_the_compiled_niche_pipeline():
    loaded = components.load_component_from_file(str(pipelines.COMPILED_DIR / "niche-automl.yaml"))
    assert loaded.name == "niche-automl"
    assert set(loaded.component_spec.inputs) == {"budget_minutes", "niches"}


@pytest.mark.slow
def test_niche_pipeline_fans_out_over_niches_locally(tmp_path: Path):
    """The global study, then one ParallelFor task per niche, in kfp.local."""
    settings = make_settings(tmp_path / "state")
    results = pipelines.run_local(
        settings, "niche-automl", {"budget_minutes": 0.3, "niches": "music,comedy"}
    )
    assert sorted(r["model"] for r in results) == ["niche-comedy", "niche-music"]
    client = registry.connect(settings)
    for name in ("niche-global", "niche-music", "niche-comedy"):
        assert registry.alias_version(client, name, registry.Alias.CHAMPION) == "1"


def test_kfp_loads_the_compiled_script_pipeline():
    """One task: the recipe decides whether it trains in the task or submits a TrainJob."""
    loaded = components.load_component_from_file(
        str(pipelines.COMPILED_DIR / "script-finetune.yaml")
    )
    assert loaded.name == "script-finetune"
    assert set(loaded.component_spec.inputs) == {"config"}
    assert loaded.component_spec.inputs["config"].default == "training/llm/configs/tiny-cpu.yaml"
    (task,) = loaded.pipeline_spec.root.dag.tasks.values()
    assert task.component_ref.name == "comp-finetune-script"
    assert not task.caching_options.enable_cache


def test_kfp_loads_the_compiled_monitoring_pipeline():
    """The drift check, then the trigger; neither cached, as each run reads the files anew."""
    loaded = components.load_component_from_file(str(pipelines.COMPILED_DIR / "monitoring.yaml"))
    assert loaded.name == "monitoring"
    assert set(loaded.component_spec.inputs) == {
        "model",
        "reference_path",
        "current_path",
        "window_id",
        "current_metric",
    }
    tasks = loaded.pipeline_spec.root.dag.tasks
    assert set(tasks) == {"drift-check", "retrain-trigger"}
    assert list(tasks["retrain-trigger"].dependent_tasks) == ["drift-check"]
    assert not any(task.caching_options.enable_cache for task in tasks.values())


def test_start_local_runs_the_pipeline_in_the_background_with_a_log(tmp_path: Path):
    settings = make_settings(tmp_path / "state")
    with pytest.raises(PipelineError, match="unknown pipeline 'nope'"):
        pipelines.start_local(settings, "nope", {})
    missing = tmp_path / "missing.parquet"
    started = pipelines.start_local(
        settings,
        "monitoring",
        {"model": "quality", "reference_path": str(missing), "current_path": str(missing)},
    )
    pid = int(started.split()[2].rstrip(","))
    log = Path(started.split("log ")[1])
    _, status = os.waitpid(pid, 0)  # our child: the test waits, a monitor does not
    assert os.waitstatus_to_exitcode(status) != 0
    assert str(missing) in log.read_text()  # the run's own error, in its log
