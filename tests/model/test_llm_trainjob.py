"""The multi-node launcher: the TrainJob manifest against the Kubeflow Trainer CRD's schema, the
submit-and-wait loop against a scripted API, and every fine-tuning recipe."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest

from contentml import cluster
from contentml.recipes import ConfigError
from entrypoints.manifests import crd_validator
from tests.conftest import SCHEMAS_DIR, make_settings
from training.llm.config import CONFIGS, FinetuneConfig, Launcher, load_config
from training.llm.trainjob import (
    HOSTFILE,
    RUNTIME,
    TrainJobFailed,
    TrainJobRecipeError,
    TrainJobTimeout,
    launch,
    submit_and_wait,
    trainjob_manifest,
)

CRD = SCHEMAS_DIR / "kubeflow-trainer" / "trainer.kubeflow.org_trainjobs.yaml"
RECIPE = CONFIGS / "a100x16.yaml"
RECIPE_PATH = "training/llm/configs/a100x16.yaml"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    return crd_validator(CRD, "v1alpha1")


@pytest.fixture
def recipe() -> FinetuneConfig:
    return load_config(RECIPE)


@pytest.fixture
def manifest(recipe, tmp_path) -> dict:
    settings = make_settings(
        tmp_path / "state",
        MLFLOW_TRACKING_URI="http://mlflow.mlflow.svc:5000",
        CONTENTML_TRAINING_IMAGE="registry.example/contentml/training:1.2.3",
    )
    return trainjob_manifest(recipe, RECIPE_PATH, settings, "finetune-a100x16-0a1b2c3d", "ml")


def test_manifest_validates_against_the_trainjob_crd(manifest, validator):
    errors = [e.message for e in validator.iter_errors(manifest)]
    assert errors == []
    # The CRD's CEL rule on the name, which a JSON schema cannot express.
    name = manifest["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert manifest["kind"] == "TrainJob"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "trainer", "resourcePerNode"), {}),  # misspelt: the server would drop it
        (("spec", "trainer", "numNodes"), "2"),
        (("spec", "trainer", "resourcesPerNode", "limits", "nvidia.com/gpu"), "eight"),
        (("spec", "trainer", "env"), [{"value": "no name"}]),
    ],
)
def test_the_schema_check_catches_a_broken_manifest(manifest, validator, path, value):
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert list(validator.iter_errors(manifest))


def test_manifest_runs_the_recipe_on_two_nodes_of_eight_gpus(manifest):
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {
        "name": RUNTIME,
        "kind": "TrainingRuntime",
        "apiGroup": "trainer.kubeflow.org",
    }
    assert RUNTIME == "deepspeed-distributed"
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    for kind in ("requests", "limits"):
        assert trainer["resourcesPerNode"][kind]["nvidia.com/gpu"] == "8"
    assert trainer["image"] == "registry.example/contentml/training:1.2.3"
    # mpirun on the launcher starts 16 ranks over the runtime's hostfile; each runs the entry
    # point that `launcher: local` runs in-process.
    command = trainer["command"]
    assert command[:5] == ["mpirun", "--hostfile", HOSTFILE, "-np", "16"]
    steps = str(load_config(RECIPE).max_steps)
    assert trainer["args"] == [
        "contentml",
        "llm",
        "finetune",
        "--config",
        RECIPE_PATH,
        "--max-steps",
        steps,
    ]


def test_every_rank_gets_the_settings_by_reference(manifest):
    trainer = manifest["spec"]["trainer"]
    env = {item["name"]: item for item in trainer["env"]}
    # Every setting from the cluster's ConfigMap, every credential from its Secret; no value
    # of this machine's settings (a laptop path, a password) is written into the manifest.
    assert set(env) == set(cluster.CONFIG_VARIABLES) | set(
        cluster.WORKLOAD_CREDENTIALS[cluster.Workload.TRAINING]
    )
    # Training writes to MLflow and the bucket but serves nothing: no bearer token.
    assert not set(env) & set(cluster.TOKEN_VARIABLES)
    assert all("value" not in item for item in env.values())
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"] == {
        "configMapKeyRef": {"name": cluster.SETTINGS_CONFIG_MAP, "key": "MLFLOW_TRACKING_URI"}
    }
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        cluster.CREDENTIALS_SECRET
    )
    assert "http://mlflow.mlflow.svc:5000" not in str(manifest)
    # Ranks on the other node start over ssh: mpirun exports each variable by name.
    command = trainer["command"]
    exported = {command[i + 1] for i, flag in enumerate(command[:-1]) if flag == "-x"}
    assert set(env) <= exported


def test_suspended_and_namespaced_as_asked(recipe, tmp_path):
    settings = make_settings(tmp_path)
    plain = trainjob_manifest(recipe, RECIPE_PATH, settings, "finetune-x")
    assert "namespace" not in plain["metadata"] and "suspend" not in plain["spec"]
    held = trainjob_manifest(recipe, RECIPE_PATH, settings, "finetune-x", "ml", suspend=True)
    assert held["metadata"]["namespace"] == "ml" and held["spec"]["suspend"] is True


def test_labels_name_the_recipe(manifest):
    labels = manifest["metadata"]["labels"]
    assert labels["contentml/recipe"] == "a100x16"
    assert labels["app.kubernetes.io/part-of"] == "contentml"


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"launcher": "local"}, "launcher 'local' on 'gpu'"),
        ({"accelerator": "cpu", "precision": "32-true"}, "launcher 'trainjob' on 'cpu'"),
    ],
)
def test_a_local_or_cpu_recipe_is_refused(tmp_path, overrides, problem):
    config = load_config(RECIPE, **overrides)
    with pytest.raises(TrainJobRecipeError, match=problem):
        trainjob_manifest(config, "x.yaml", make_settings(tmp_path), "finetune-x", "ml")


def test_the_tiny_cpu_recipe_is_refused(tmp_path):
    config = load_config(CONFIGS / "tiny-cpu.yaml")
    with pytest.raises(TrainJobRecipeError, match="launcher 'local' on 'cpu'"):
        trainjob_manifest(config, "tiny-cpu.yaml", make_settings(tmp_path), "finetune-x", "ml")


def test_a_bad_name_is_refused(recipe, tmp_path):
    with pytest.raises(TrainJobRecipeError, match="DNS label"):
        trainjob_manifest(recipe, RECIPE_PATH, make_settings(tmp_path), "Finetune_1", "ml")


def test_launch_refuses_several_nodes_in_one_process(tmp_path):
    local = tmp_path / "local-2-nodes.yaml"
    local.write_text("launcher: local\nnum_nodes: 2\n")
    with pytest.raises(TrainJobRecipeError, match="2 nodes need launcher 'trainjob'"):
        launch(make_settings(tmp_path / "state"), local)


class FakeCustomObjects:
    """`CustomObjectsApi` with the TrainJob's statuses scripted, one per read."""

    def __init__(self, *statuses: dict):
        self.statuses = list(statuses)
        self.created: list[dict] = []
        self.reads: list[dict] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append(
            {"group": group, "version": version, "namespace": namespace, "plural": plural}
        )
        self.body = body
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.reads.append({"namespace": namespace, "plural": plural, "name": name})
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {**self.body, "status": status}


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def condition(kind: str, status: str = "True", reason: str = "Reason", message: str = "") -> dict:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-08-01T00:00:00Z",
    }


RUNNING = {"conditions": [condition("Created", reason="JobsCreationSucceeded")]}


def wait(manifest, api, clock, timeout=600.0):
    return submit_and_wait(
        manifest, api, poll_seconds=30.0, timeout_seconds=timeout, sleep=clock.sleep, clock=clock
    )


def test_submit_and_wait_returns_the_status_once_complete(manifest, validator):
    done = {
        "conditions": [
            condition("Created", reason="JobsCreationSucceeded"),
            condition("Complete", reason="JobsCompleted", message="jobset completed"),
        ]
    }
    api, clock = FakeCustomObjects(RUNNING, RUNNING, done), FakeClock()
    assert wait(manifest, api, clock) == done
    assert api.created == [
        {
            "group": "trainer.kubeflow.org",
            "version": "v1alpha1",
            "namespace": "ml",
            "plural": "trainjobs",
        }
    ]
    assert list(validator.iter_errors(api.body)) == []
    assert len(api.reads) == 3 and api.reads[-1]["name"] == "finetune-a100x16-0a1b2c3d"
    assert clock.sleeps == [30.0, 30.0]
    # The status the scripted API returned is one the CRD accepts.
    assert list(validator.iter_errors({**api.body, "status": done})) == []


def test_a_failed_trainjob_raises_with_its_reason_and_message(manifest):
    failed = {
        "conditions": [
            condition("Complete", status="False", reason="JobsNotCompleted"),
            condition("Failed", reason="JobsFailed", message="node-0 OOMKilled"),
        ]
    }
    api, clock = FakeCustomObjects(RUNNING, failed), FakeClock()
    with pytest.raises(TrainJobFailed, match="ml/finetune-a100x16-0a1b2c3d failed: "
                       "JobsFailed: node-0 OOMKilled"):  # fmt: skip
        wait(manifest, api, clock)
    assert len(api.reads) == 2


def test_a_condition_that_is_not_true_does_not_end_the_wait(manifest):
    not_yet = {"conditions": [condition("Complete", status="False", reason="Running")]}
    api, clock = FakeCustomObjects(not_yet), FakeClock()
    with pytest.raises(TrainJobTimeout):
        wait(manifest, api, clock, timeout=90.0)


def test_a_trainjob_that_never_finishes_times_out(manifest):
    api, clock = FakeCustomObjects(RUNNING), FakeClock()
    with pytest.raises(TrainJobTimeout, match="did not finish in 300 s"):
        wait(manifest, api, clock, timeout=300.0)
    assert clock.now >= 300.0 and len(api.reads) == 11


def test_a_status_not_yet_written_is_waited_on(manifest):
    api, clock = FakeCustomObjects({}, {"conditions": [condition("Complete")]}), FakeClock()
    assert wait(manifest, api, clock)["conditions"][0]["type"] == "Complete"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path: Path):
    config = load_config(path)
    assert isinstance(config, FinetuneConfig)
    if config.launcher == Launcher.TRAINJOB:
        assert config.accelerator == "gpu" and config.precision != "32-true"


def test_the_gpu_recipe_is_two_nodes_of_eight(recipe):
    assert (recipe.num_nodes, recipe.devices, recipe.world_size) == (2, 8, 16)
    assert recipe.zero_stage == 3 and recipe.precision.startswith("bf16")
    assert recipe.tokenizer == "" and recipe.modules_to_save == []
    assert set(recipe.lora_target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip
    assert (recipe.seq_len, recipe.micro_batch_size, recipe.gradient_checkpointing) == (
        2048,
        4,
        True,
    )


def test_a_recipe_with_an_unknown_launcher_fails_to_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("launcher: slurm\n")
    with pytest.raises(ConfigError, match="launcher must be one of"):
        load_config(bad)


def test_launch_runs_a_local_recipe_in_this_process(monkeypatch, tmp_path):
    import training.llm.train

    calls = []
    monkeypatch.setattr(
        training.llm.train, "finetune", lambda s, c: calls.append((s, c)) or {"version": "1"}
    )
    settings = make_settings(tmp_path / "state")
    assert launch(settings, CONFIGS / "tiny-cpu.yaml") == {"version": "1"}
    assert calls == [(settings, load_config(CONFIGS / "tiny-cpu.yaml"))]


def test_launch_submits_a_trainjob_recipe_with_the_kube_config(monkeypatch, tmp_path):
    """Outside a cluster the kube config's namespace is used; the in-cluster path (service
    account token and namespace file) is only reachable in a pod."""
    from kubernetes import client
    from kubernetes import config as kube_config

    def not_in_cluster():
        raise kube_config.ConfigException("not in a pod")

    api = FakeCustomObjects({"conditions": [condition("Complete")]})
    monkeypatch.setattr(kube_config, "load_incluster_config", not_in_cluster)
    monkeypatch.setattr(kube_config, "load_kube_config", lambda: None)
    monkeypatch.setattr(
        kube_config, "list_kube_config_contexts", lambda: ([], {"context": {"namespace": "ml"}})
    )
    monkeypatch.setattr(client, "CustomObjectsApi", lambda: api)
    monkeypatch.chdir(CONFIGS.parents[2])  # the image's working directory: the repo root
    result = launch(make_settings(tmp_path / "state"), Path(RECIPE_PATH), max_steps=7)
    assert re.fullmatch(r"finetune-a100x16-[0-9a-f]{8}", result["trainjob"])
    assert result["namespace"] == "ml" and result["status"]["conditions"][0]["type"] == "Complete"
    assert api.body["metadata"]["name"] == result["trainjob"]
    # Every rank reads the recipe from the image, with the steps this launch gave.
    assert api.body["spec"]["trainer"]["args"][-3:] == [RECIPE_PATH, "--max-steps", "7"]
