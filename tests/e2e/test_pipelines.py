"""Pipelines compile to the committed YAML, which KFP's own loader accepts and whose
`platforms.kubernetes` section places every task in the cluster."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kfp import components

from contentml import cluster, launch, registry
from contentml.settings import Settings
from entrypoints import runner
from entrypoints.runner import PipelineError
from tests.conftest import DATA_DIR, make_settings
from tests.helpers.llm import TINY
from training.revenue import channel_settings


def test_compiled_yaml_is_committed_and_current(tmp_path: Path):
    for path in runner.compile_all(tmp_path):
        committed = runner.COMPILED_DIR / path.name
        assert committed.exists(), f"run `make compile` and commit {committed}"
        assert path.read_text() == committed.read_text(), f"run `make compile`: {path.name}"


def test_kfp_loads_the_compiled_pipeline():
    loaded = components.load_component_from_file(str(runner.COMPILED_DIR / "training.yaml"))
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
    arguments = runner.parse_arguments(
        "training", ["max_series=3", "promotion_margin=0.1", "model_name=trend"]
    )
    assert arguments == {"max_series": 3, "promotion_margin": 0.1, "model_name": "trend"}


@pytest.mark.parametrize(
    ("name", "pairs", "problem"),
    [
        ("nope", [], "unknown pipeline 'nope'"),
        ("training", ["colour=red"], "bad parameter 'colour"),
        ("training", ["max_series"], "bad parameter 'max_series'"),
        ("training", ["max_series=many"], "max_series needs a int"),
    ],
)
def test_bad_arguments_name_the_problem(name, pairs, problem):
    with pytest.raises(PipelineError, match=problem):
        runner.parse_arguments(name, pairs)


def test_kfp_loads_the_compiled_quality_pipeline():
    loaded = components.load_component_from_file(str(runner.COMPILED_DIR / "quality-training.yaml"))
    assert loaded.name == "quality-training"
    assert set(loaded.component_spec.inputs) == {
        "model_name",
        "data_path",
        "epochs",
        "learning_rate",
        "max_train_rows",
        "folds",
        "promotion_margin",
    }


@pytest.mark.slow
def test_quality_pipeline_runs_locally_and_registers_a_champion(tmp_path: Path):
    """The same stages as `contentml quality train`, as KFP tasks in kfp.local."""
    sample = tmp_path / "sample.csv"
    raw = pd.read_csv(DATA_DIR / "toxicity" / "train.csv", dtype=str, keep_default_na=False)
    raw.groupby("class", group_keys=False).sample(n=150, random_state=0).to_csv(sample, index=False)
    settings = make_settings(tmp_path / "state")
    gate = runner.run_local(
        settings,
        "quality-training",
        {
            "data_path": str(sample),
            "epochs": 1,
            "max_train_rows": 200,
            "learning_rate": 3e-4,
            "folds": 2,
        },
    )
    assert gate["promoted"] is True and gate["metric"] == "weighted_f1"
    client = registry.connect(settings)
    assert registry.alias_version(client, "quality", registry.Alias.CHAMPION) == "1"
    run = client.get_run(client.get_model_version("quality", "1").run_id)
    assert run.data.params["epochs"] == "1" and run.data.params["folds"] == "2"
    assert "weighted_f1" in run.data.metrics and "hate_threshold" in run.data.params


def test_kfp_loads_the_compiled_niche_pipeline():
    loaded = components.load_component_from_file(str(runner.COMPILED_DIR / "niche-automl.yaml"))
    assert loaded.name == "niche-automl"
    assert set(loaded.component_spec.inputs) == {"budget_minutes", "niches"}


@pytest.mark.slow
def test_niche_pipeline_fans_out_over_niches_locally(tmp_path: Path):
    """The global study, then one ParallelFor task per niche, in kfp.local."""
    settings = make_settings(tmp_path / "state")
    printing = builtins.print
    results = runner.run_local(
        settings, "niche-automl", {"budget_minutes": 0.3, "niches": "music,comedy"}
    )
    assert builtins.print is printing  # kfp.local's swap for its indented task logs is undone
    assert sorted(r["model"] for r in results) == ["niche-comedy", "niche-music"]
    client = registry.connect(settings)
    for name in ("niche-global", "niche-music", "niche-comedy"):
        assert registry.alias_version(client, name, registry.Alias.CHAMPION) == "1"


def test_kfp_loads_the_compiled_script_pipeline():
    """One task per node pool, of which a run takes the one its `node_pool` names; the recipe
    decides whether that task trains itself or submits a TrainJob."""
    loaded = components.load_component_from_file(str(runner.COMPILED_DIR / "script-finetune.yaml"))
    assert loaded.name == "script-finetune"
    inputs = loaded.component_spec.inputs
    assert set(inputs) == {"config", "node_pool", "max_steps"}
    assert inputs["config"].default == "training/llm/configs/tiny-cpu.yaml"
    assert inputs["node_pool"].default == "cpu"
    assert inputs["max_steps"].default == 0  # the recipe's
    components_ = loaded.pipeline_spec.components
    (branches,) = loaded.pipeline_spec.root.dag.tasks.values()
    pools = {
        branch.task_info.name: branch.trigger_policy.condition
        for branch in components_[branches.component_ref.name].dag.tasks.values()
    }
    gpu_test = "inputs.parameter_values['pipelinechannel--node_pool'] == 'gpu'"
    assert pools == {"gpu-pool": gpu_test, "cpu-pool": f"!({gpu_test})"}
    for branch in components_[branches.component_ref.name].dag.tasks.values():
        (task,) = components_[branch.component_ref.name].dag.tasks.values()
        assert task.component_ref.name.startswith("comp-finetune-script")
        assert not task.caching_options.enable_cache


@pytest.mark.slow
def test_script_pipeline_runs_locally(tmp_path: Path):
    """kfp.local takes the branch `node_pool` names (by default the CPU one; it ignores the
    pool's placement) and returns the summary through `dsl.OneOf`. Both branches run the same
    component: one run of the default covers the control flow in kfp.local."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "max_steps": 4, "warmup_steps": 1}))
    settings = make_settings(tmp_path / "state")
    arguments = runner.parse_arguments("script-finetune", [f"config={recipe}"])
    summary = runner.run_local(settings, "script-finetune", arguments)
    assert summary["model"] == "script" and summary["bits_per_byte"] > 0
    assert summary["version"] == "1"


def test_kfp_loads_the_compiled_monitoring_pipeline():
    """The drift check, then the trigger; neither cached, as each run reads the files anew."""
    loaded = components.load_component_from_file(str(runner.COMPILED_DIR / "monitoring.yaml"))
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


def test_kfp_loads_the_compiled_optimization_pipeline():
    """Tell the day's outcomes, then publish the next settings; neither cached, as each run
    reads the file and the studies anew."""
    loaded = components.load_component_from_file(str(runner.COMPILED_DIR / "optimization.yaml"))
    assert loaded.name == "optimization"
    inputs = loaded.component_spec.inputs
    assert set(inputs) == {"outcomes_path", "studies"}
    assert inputs["studies"].default == ""
    tasks = loaded.pipeline_spec.root.dag.tasks
    assert set(tasks) == {"tell-outcomes", "publish-settings"}
    assert list(tasks["publish-settings"].dependent_tasks) == ["tell-outcomes"]
    assert not any(task.caching_options.enable_cache for task in tasks.values())


@pytest.mark.slow
def test_optimization_pipeline_tells_and_publishes_locally(tmp_path: Path):
    """A trial's outcome goes in, the study's next trial comes out (kfp.local)."""
    settings = make_settings(tmp_path / "state")
    asked = channel_settings.suggest(settings, "main")
    outcomes = tmp_path / "outcomes.csv"
    pd.DataFrame({"study": ["main"], "trial": [asked["trial"]], "value": [4.0]}).to_csv(
        outcomes, index=False
    )
    published = runner.run_local(settings, "optimization", {"outcomes_path": str(outcomes)})
    assert list(published) == ["main"] and published["main"]["trial"] == asked["trial"] + 1
    assert channel_settings.best(settings, "main")["value"] == 4.0


@pytest.mark.slow
def test_start_local_runs_the_pipeline_in_the_background_with_a_log(tmp_path: Path):
    settings = make_settings(tmp_path / "state")
    with pytest.raises(PipelineError, match="unknown pipeline 'nope'"):
        launch.start_local(settings, "nope", {})
    missing = tmp_path / "missing.parquet"
    started = launch.start_local(
        settings,
        "monitoring",
        {"model": "quality", "reference_path": str(missing), "current_path": str(missing)},
    )
    pid = int(started.split()[2].rstrip(","))
    log = Path(started.split("log ")[1])
    _, status = os.waitpid(pid, 0)  # our child: the test waits, a monitor does not
    assert os.waitstatus_to_exitcode(status) != 0
    assert str(missing) in log.read_text()  # the run's own error, in its log


# --- the cluster: what kfp-kubernetes writes into each compiled YAML ------------------------

GPU_EXECUTORS = {"script-finetune": {"exec-finetune-script"}}
"""Executors that run on the GPU pool (one A100 for a `launcher: local` recipe)."""


def compiled_executors(name: str) -> tuple[dict, dict]:
    """(executor label -> executor of the pipeline spec, label -> its Kubernetes config)."""
    text = (runner.COMPILED_DIR / f"{name}.yaml").read_text()
    spec, platform = yaml.safe_load_all(text)
    return (
        spec["deploymentSpec"]["executors"],
        platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"],
    )


@pytest.mark.parametrize("name", runner.PIPELINES)
def test_every_task_reads_the_cluster_settings_credentials_and_data(name: str):
    executors, kubernetes = compiled_executors(name)
    assert set(kubernetes) == set(executors), "a task lacks `on_cluster` (pipelines/platform.py)"
    images = Settings.from_env()
    for label, executor in executors.items():
        # The GPU pool runs the training image (CUDA, DeepSpeed's ops), the rest the platform's.
        gpu = label in GPU_EXECUTORS.get(name, set())
        image = images.training_image if gpu else images.platform_image
        assert executor["container"]["image"] == image, label
        config = kubernetes[label]
        (settings,) = config["configMapAsEnv"]
        assert settings["configMapName"] == cluster.SETTINGS_CONFIG_MAP
        assert not settings["optional"], "every setting must come from the cluster"
        assert {(e["configMapKey"], e["envVar"]) for e in settings["keyToEnv"]} == {
            (variable, variable) for variable in cluster.CONFIG_VARIABLES
        }
        (credentials,) = config["secretAsEnv"]
        assert credentials["secretName"] == cluster.CREDENTIALS_SECRET
        assert {(e["secretKey"], e["envVar"]) for e in credentials["keyToEnv"]} == {
            (variable, variable)
            for variable in cluster.WORKLOAD_CREDENTIALS[cluster.Workload.TRAINING]
        }
        (data,) = config["pvcMount"]
        assert (data["constant"], data["mountPath"]) == (cluster.DATA_CLAIM, cluster.DATA_MOUNT)
        assert config["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": str(cluster.RUN_AS_USER),
        }


@pytest.mark.parametrize("name", runner.PIPELINES)
def test_every_task_has_a_node_pool_and_only_the_gpu_task_a_gpu(name: str):
    executors, kubernetes = compiled_executors(name)
    gpu_tolerations = [dict(toleration) for toleration in cluster.GPU_TOLERATIONS]
    for label, executor in executors.items():
        accelerator = executor["container"].get("resources", {}).get("accelerator")
        if label in GPU_EXECUTORS.get(name, set()):
            assert kubernetes[label]["nodeSelector"]["labels"] == cluster.GPU_NODE_SELECTOR
            assert kubernetes[label]["tolerations"] == gpu_tolerations
            assert accelerator["resourceType"] == "nvidia.com/gpu"
            assert accelerator["resourceCount"] == "1"
        else:
            assert kubernetes[label]["nodeSelector"]["labels"] == cluster.CPU_NODE_SELECTOR
            assert "tolerations" not in kubernetes[label] and accelerator is None, label


@pytest.mark.parametrize("name", runner.PIPELINES)
def test_no_credential_is_written_into_the_yaml(name: str):
    """Credentials reach a task by reference to the Secret only: no task sets one as a literal
    environment variable, and this machine's values of them appear nowhere in the file."""
    executors, _ = compiled_executors(name)
    for label, executor in executors.items():
        literal = {variable["name"] for variable in executor["container"].get("env", [])}
        assert not literal & set(cluster.SECRET_VARIABLES), label
    text = (runner.COMPILED_DIR / f"{name}.yaml").read_text()
    here = Settings.from_env().to_env()
    for variable in cluster.SECRET_VARIABLES:
        assert not here.get(variable) or here[variable] not in text, variable
