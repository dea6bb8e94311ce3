"""The kustomize overlays, rendered with the real kubectl and checked offline: every object
against its schema (Kubernetes' own, KServe's and Kubeflow Trainer's CRDs), no plain-text
secret, no root container, and what production needs is there."""

from __future__ import annotations

import copy
import re
import shutil

import pytest
import yaml

from contentml import cluster, manifests
from contentml.manifests import ManifestError
from contentml.settings import Settings
from tests.conftest import SCHEMAS_DIR, make_settings, run_cli
from training.llm.config import load_config
from training.llm.trainjob import RUNTIME, trainjob_manifest

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed: the overlays render with `kubectl kustomize`",
)

PROD_TRAINJOB = manifests.MANIFESTS_DIR / "overlays" / "prod" / "trainjob-a100x16.yaml"


@pytest.fixture(scope="module", params=manifests.OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, manifests.render(manifests.overlay_dir(request.param))


@pytest.fixture(scope="module")
def prod() -> list[dict]:
    return manifests.render(manifests.overlay_dir("prod"))


def find(documents: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        d
        for d in documents
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def test_every_object_of_every_overlay_is_valid(overlay):
    name, _ = overlay
    report = manifests.check(name, SCHEMAS_DIR)
    assert report.problems == []
    assert report.kinds["InferenceService"] == 5


def test_prod_serves_the_four_models_and_trains_on_two_nodes_of_eight_gpus(prod):
    services = {d["metadata"]["name"]: d for d in find(prod, "InferenceService")}
    assert set(services) == {"trend", "quality", "niche", "script", "revenue"}
    for name in ("trend", "quality", "niche", "revenue"):
        predictor = services[name]["spec"]["predictor"]
        assert predictor["model"]["runtime"] == "contentml"
        assert predictor["minReplicas"] >= 2 and predictor["maxReplicas"] > predictor["minReplicas"]
    script = services["script"]["spec"]["predictor"]
    assert script["model"]["modelFormat"] == {"name": "huggingface"}
    assert "--backend=vllm" in script["model"]["args"]
    assert script["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert script["tolerations"] == list(cluster.GPU_TOLERATIONS)
    (runtime,) = find(prod, "ServingRuntime", "contentml")
    (container,) = runtime["spec"]["containers"]
    assert container["envFrom"] == cluster.env_from()

    (job,) = find(prod, "TrainJob")
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    # Its runtime is in the overlay, in the TrainJob's namespace, on the training image.
    reference = job["spec"]["runtimeRef"]
    (training_runtime,) = find(prod, reference["kind"], reference["name"])
    assert reference["name"] == RUNTIME
    assert training_runtime["metadata"]["namespace"] == job["metadata"]["namespace"]
    images = {
        c["image"]
        for replicated in training_runtime["spec"]["template"]["spec"]["replicatedJobs"]
        for c in replicated["template"]["spec"]["template"]["spec"]["containers"]
    }
    assert images == {trainer["image"]}


def test_the_prod_trainjob_is_the_one_the_launcher_renders(tmp_path):
    """The checked-in TrainJob is `contentml llm trainjob`'s output, not a copy to keep up."""
    recipe = "training/llm/configs/a100x16.yaml"
    rendered = trainjob_manifest(
        load_config(manifests.MANIFESTS_DIR.parent / recipe),
        recipe,
        make_settings(tmp_path),
        "finetune-a100x16",
        "contentml",
        suspend=True,
    )
    assert yaml.safe_load(PROD_TRAINJOB.read_text()) == rendered


def test_the_settings_config_map_makes_valid_settings(overlay):
    """Every setting is declared for the cluster, none is a credential, and together with the
    credentials they are settings the platform accepts."""
    _, documents = overlay
    (config_map,) = find(documents, "ConfigMap", cluster.SETTINGS_CONFIG_MAP)
    data = config_map["data"]
    assert set(data) == set(cluster.CONFIG_VARIABLES)
    assert not set(data) & set(cluster.SECRET_VARIABLES)
    credentials = {
        "CONTENTML_FEAST_REGISTRY": "postgresql://feast:password@postgres:5432/feast",
        "CONTENTML_OPTUNA_STORAGE": "postgresql://optuna:password@postgres:5432/optuna",
        "CONTENTML_FEAST_REDIS_URL": "redis:6379",
    }
    settings = Settings.from_env({**data, **credentials})
    assert settings.feast_online_store == "redis"
    assert settings.mlflow_tracking_uri.startswith("http://mlflow.contentml-system.svc")


def test_pods_reference_objects_that_exist_or_secrets_made_outside(overlay):
    """Service accounts and ConfigMaps are in the overlay; Secrets are not (they hold the
    credentials) and must be the documented ones."""
    _, documents = overlay
    present = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in documents
    }
    external_secrets = {cluster.CREDENTIALS_SECRET, "mlflow-server"}
    for document in documents:
        namespace = document["metadata"].get("namespace")
        for _, node in manifests.walk(document):
            if not isinstance(node, dict):
                continue
            if "serviceAccountName" in node:
                assert ("ServiceAccount", namespace, node["serviceAccountName"]) in present
            for key in ("configMapRef", "configMapKeyRef"):
                if key in node:
                    assert ("ConfigMap", namespace, node[key]["name"]) in present
            for key in ("secretRef", "secretKeyRef"):
                if key in node:
                    assert node[key]["name"] in external_secrets
            if "secretName" in node:
                assert node["secretName"] in external_secrets
    assert not find(documents, "Secret")


def test_only_platform_namespaces_reach_the_servers(overlay):
    _, documents = overlay
    platform = {
        d["metadata"]["name"]
        for d in find(documents, "Namespace")
        if d["metadata"]["labels"].get("contentml.io/platform") == "true"
    }
    assert platform == {"contentml", "contentml-system"}
    policies = {d["metadata"]["name"]: d["spec"] for d in find(documents, "NetworkPolicy")}
    for server in ("mlflow", "feast"):
        spec = policies[server]
        assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": server}
        ((rule,),) = [[r for r in spec["ingress"]]]
        assert rule["from"] == [
            {"namespaceSelector": {"matchLabels": {"contentml.io/platform": "true"}}}
        ]


def test_images_are_the_platforms_at_the_overlays_tag(overlay):
    _, documents = overlay
    images = set()
    for document in documents:
        for path, node in manifests.walk(document):
            if path.endswith(".image") or path.endswith("trainer.image"):
                images.add(node)
    assert images == {"ghcr.io/contentml/platform:0.1.0", "ghcr.io/contentml/training:0.1.0"}


def test_the_mlflow_server_runs_with_auth_postgres_and_s3(prod):
    (deployment,) = find(prod, "Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert "--app-name=basic-auth" in args and "--serve-artifacts" in args
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    store = next(e for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert store["valueFrom"]["secretKeyRef"]["name"] == "mlflow-server"


def broken(documents: list[dict], kind: str, name: str, change) -> dict:
    (document,) = find(documents, kind, name)
    document = copy.deepcopy(document)
    change(document)
    return document


def _pod(document: dict) -> dict:
    return document["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("kind", "name", "change", "problem"),
    [
        (
            "Deployment",
            "feast",
            lambda d: _pod(d)["containers"][0].update(imagePullPolicyy="Always"),
            "'imagePullPolicyy' was unexpected",
        ),
        (
            "InferenceService",
            "trend",
            lambda d: d["spec"]["predictor"].update(minReplica=1),
            "'minReplica' was unexpected",
        ),
        (
            "TrainJob",
            "finetune-a100x16",
            lambda d: d["spec"]["trainer"].update(numNodes="2"),
            "'2' is not of type 'integer'",
        ),
        (
            "Deployment",
            "feast",
            lambda d: _pod(d)["containers"][0].update(
                env=[{"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"}]
            ),
            "MLFLOW_TRACKING_PASSWORD has a plain-text value",
        ),
        (
            "Deployment",
            "mlflow",
            lambda d: _pod(d).pop("securityContext"),
            "may run as root",
        ),
        (
            "InferenceService",
            "quality",
            lambda d: d["spec"]["predictor"]["securityContext"].update(runAsUser=0),
            "may run as root",
        ),
    ],
)
def test_the_check_names_a_broken_object(prod, kind, name, change, problem):
    document = broken(prod, kind, name, change)
    found = (
        manifests.schema_problems(document, SCHEMAS_DIR)
        + manifests.secret_problems(document)
        + manifests.root_problems(document)
    )
    assert any(problem in line for line in found), found


def test_a_secret_with_values_and_an_unknown_kind_are_refused():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"k": ""}}
    assert "carries secret values" in manifests.secret_problems(secret)[0]
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {}}
    assert "no schema for" in manifests.schema_problems(rule, SCHEMAS_DIR)[0]


def test_make_manifests_reports_each_overlay(tmp_path):
    done = run_cli(tmp_path, "manifests", "check", "--schemas", str(SCHEMAS_DIR))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == list(manifests.OVERLAYS)
    assert all(re.fullmatch(r"\w+: \d+ objects valid \(.*InferenceService 5.*\)", x) for x in lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--overlay", "staging"], "no overlay 'staging'"),
        (["--schemas", "/nonexistent"], "no kserve/ and kubeflow-trainer/ CRD folders"),
    ],
)
def test_bad_requests_exit_2(tmp_path, args, message):
    done = run_cli(tmp_path, "manifests", "check", *args)
    assert done.returncode == 2 and message in done.stderr


def test_without_kubectl_the_error_says_so(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ManifestError, match="kubectl not found"):
        manifests.render(manifests.overlay_dir("dev"))
