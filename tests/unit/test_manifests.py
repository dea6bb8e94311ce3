"""The kustomize overlays, rendered with the real kubectl and checked offline: every object
against its schema (Kubernetes' own, KServe's and Kubeflow Trainer's CRDs), no plain-text
secret, no root container, every pod within the restricted Pod Security Standard, and what
production needs is there."""

from __future__ import annotations

import copy
import re
import shutil
from collections import Counter
from collections.abc import Callable

import pytest
import yaml

from contentml import cluster
from contentml.settings import Settings
from entrypoints import manifests
from entrypoints.cli import build_parser
from entrypoints.manifests import ManifestError, Rule
from serving import auth_proxy
from serving.backend.tasks import TASKS, Task
from serving.caller import providers_config
from tests.conftest import SCHEMAS_DIR, make_settings
from tests.helpers.registry import cli
from training.llm.config import load_config
from training.llm.trainjob import RUNTIME, trainjob_manifest

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed: the overlays render with `kubectl kustomize`",
)

PROD_TRAINJOB = manifests.MANIFESTS_DIR / "overlays" / "prod" / "trainjob-a100x16.yaml"

BACKEND_INGRESS = "contentml-backend"
API = "contentml-api"
BATCH_WORKER = "contentml-batch-worker"
API_ONLY_PATHS = ("/batch", "/openapi.json")
"""Backend routes that are no task's: the batch jobs and the OpenAPI schema."""
PREDICTOR_PORT = 80
"""The port of the Service KServe makes for a predictor, `<isvc>-predictor`."""


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
    assert report.kinds["Ingress"] == 1


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
    external_secrets = {
        cluster.CREDENTIALS_SECRET,
        cluster.READER_SECRET,
        cluster.BACKEND_SECRET,
        cluster.API_TOKEN_SECRET,
        cluster.ADMIN_TOKEN_SECRET,
        cluster.PROVIDER_KEYS_SECRET,
        "mlflow-server",
    }
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


WORKLOADS = [
    ("Deployment", API, cluster.Workload.API),
    ("Deployment", BATCH_WORKER, cluster.Workload.BATCH_WORKER),
    ("Deployment", "feast", cluster.Workload.FEATURE_SERVER),
    ("Job", "contentml-schedules", cluster.Workload.SCHEDULER),
    ("ServingRuntime", "contentml", cluster.Workload.PREDICTOR),
    ("InferenceService", "script", cluster.Workload.SCRIPT),
]
"""The rendered pods of the `contentml` namespace and what they do (the TrainJob is training's,
tests/model/test_llm_trainjob.py)."""


def _credentials(document: dict) -> list[dict]:
    """The `env` entries of `document`'s pods that come from a Secret, in order."""
    return [
        entry
        for pod in manifests.pod_templates(document)
        for _, container in pod.containers
        for entry in container.get("env", [])
        if "secretKeyRef" in entry.get("valueFrom", {})
    ]


@pytest.mark.parametrize(("kind", "name", "workload"), WORKLOADS)
def test_each_pod_gets_its_workloads_credentials_key_by_key(overlay, kind, name, workload):
    """Least privilege: exactly the keys `cluster.WORKLOAD_CREDENTIALS` gives the workload, from
    the Secret it names, and no whole Secret by `envFrom`."""
    _, documents = overlay
    (document,) = find(documents, kind, name)
    assert _credentials(document) == cluster.secret_env(workload)
    for path, node in manifests.walk(document):
        assert not (path.endswith("envFrom") and any("secretRef" in e for e in node)), path


def test_only_training_holds_write_credentials(overlay):
    """The Secret with MLflow's and the bucket's write credentials reaches only the TrainJob
    (and the KFP tasks, pipelines/platform.py); the pods that serve, and KServe's storage
    initializer through the predictors' service account, get the read-only Secret."""
    _, documents = overlay
    for document in documents:
        for _, node in manifests.walk(document):
            if isinstance(node, dict) and "secretKeyRef" in node:
                if node["secretKeyRef"]["name"] == cluster.CREDENTIALS_SECRET:
                    assert document["kind"] == "TrainJob", _name(document)
    (account,) = find(documents, "ServiceAccount", "contentml-predictor")
    assert account["secrets"] == [{"name": cluster.READER_SECRET}]
    writes = set(cluster.WORKLOAD_CREDENTIALS[cluster.Workload.TRAINING].values())
    for workload in set(cluster.Workload) - {cluster.Workload.TRAINING}:
        assert not set(cluster.WORKLOAD_CREDENTIALS[workload].values()) & writes, workload


def test_the_tokens_are_required_keys_of_their_own_secrets(overlay):
    """Every pod that reads the API or admin token reads it as a required key of its Secret: a
    missing key stops the pod instead of opening the routes. The servers of admin routes (our
    predictors and the API) get the admin token; nothing else does."""
    _, documents = overlay
    readers: dict[str, set[str]] = {name: set() for name in cluster.TOKEN_VARIABLES}
    for document in documents:
        for _, node in manifests.walk(document):
            reference = isinstance(node, dict) and node.get("secretKeyRef")
            if reference and reference["key"] in cluster.TOKEN_VARIABLES:
                assert reference == {
                    "name": cluster.TOKEN_VARIABLES[reference["key"]],
                    "key": reference["key"],
                }, _name(document)
                readers[reference["key"]].add(_name(document))
    assert readers["CONTENTML_ADMIN_TOKEN"] == {
        "ServingRuntime contentml/contentml",
        f"Deployment contentml/{API}",
    }
    assert readers["CONTENTML_API_TOKEN"] >= readers["CONTENTML_ADMIN_TOKEN"] | {
        f"Deployment contentml/{BATCH_WORKER}",
    }


def _name(document: dict) -> str:
    metadata = document["metadata"]
    return f"{document['kind']} {metadata.get('namespace')}/{metadata['name']}"


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


def test_the_script_model_and_the_recipe_name_one_hub_commit(overlay):
    """The hub model the script endpoint serves, and the base weights the a100x16 recipe trains
    on, are at a commit, not a branch: the same commit in prod."""
    name, documents = overlay
    (script,) = find(documents, "InferenceService", "script")
    args = dict(a.split("=", 1) for a in script["spec"]["predictor"]["model"]["args"])
    assert manifests.REVISION.fullmatch(args["--model_revision"])
    if name == "prod":
        recipe = load_config(manifests.MANIFESTS_DIR.parent / "training/llm/configs/a100x16.yaml")
        assert recipe.base_model.endswith(f"/{args['--model_id']}/{args['--model_revision']}")


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("ghcr.io/contentml/platform:0.1.0", True),
        ("ghcr.io/contentml/training:1.12.3", True),
        ("redis@sha256:" + "0" * 64, True),
        ("ghcr.io/contentml/platform:latest", False),
        ("ghcr.io/contentml/platform", False),
        ("postgres:16", False),
        ("kserve/huggingfaceserver:v0.21.0", False),
    ],
)
def test_an_image_is_pinned_by_digest_or_is_ours_at_a_version(prod, image, pinned):
    document = broken(
        prod, "Deployment", "feast", lambda d: _pod(d)["containers"][0].update(image=image)
    )
    problems = manifests.pin_problems(document)
    assert (problems == []) is pinned, problems


PUSHED_DIGEST = "sha256:" + "0" * 64
"""Stands in for a pushed image's digest (`docker buildx imagetools inspect`): none is known
here, and none is written into the manifests."""


def test_a_release_pins_every_image_by_the_digest_its_overlay_names(overlay, tmp_path):
    """docs/deploy.md's release step: the pushed digest in the overlay's `images:` entries pins
    every pod's image, the script transformer's and the TrainJob's included. Checked with
    `require_digests`, the overlay as committed names each image that is only tagged, and
    passes once the digests are there."""
    name, _ = overlay
    copied = tmp_path / "manifests"
    shutil.copytree(manifests.MANIFESTS_DIR, copied)
    tagged = manifests.check(name, SCHEMAS_DIR, copied, require_digests=True).problems
    assert tagged and all("is not pinned by digest" in problem for problem in tagged), tagged
    transformer = "InferenceService contentml/script: spec.transformer.containers[0].image"
    assert any(problem.startswith(transformer) for problem in tagged), tagged

    kustomization = copied / "overlays" / name / "kustomization.yaml"
    spec = yaml.safe_load(kustomization.read_text())
    for entry in spec["images"]:
        entry["digest"] = PUSHED_DIGEST
    kustomization.write_text(yaml.safe_dump(spec, sort_keys=False))
    images = {
        node
        for document in manifests.render(copied / "overlays" / name)
        for path, node in manifests.walk(document)
        if path.endswith(".image")
    }
    assert images == {
        f"ghcr.io/contentml/{image}:0.1.0@{PUSHED_DIGEST}" for image in ("platform", "training")
    }
    assert manifests.check(name, SCHEMAS_DIR, copied, require_digests=True).problems == []


def test_a_hub_model_without_a_commit_is_refused(prod):
    def follow_main(document: dict) -> None:
        model = document["spec"]["predictor"]["model"]
        model["args"] = [a for a in model["args"] if not a.startswith("--model_revision")]

    (problem,) = manifests.pin_problems(broken(prod, "InferenceService", "script", follow_main))
    assert "--model_id meta-llama/Llama-2-7b-hf without --model_revision" in problem


def test_the_mlflow_server_runs_with_auth_postgres_and_s3(prod, monkeypatch):
    """`mlflow server` with basic auth, started through the check of its admin password; the
    backend store URI (with the database password) from the Secret by environment, never on
    the command line."""
    from mlflow.cli import server

    (deployment,) = find(prod, "Deployment", "mlflow")
    pod = _pod(deployment)
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "entrypoints.mlflow_server"]
    args = container["args"]
    assert "--app-name=basic-auth" in args and "--serve-artifacts" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert not any("BACKEND_STORE" in a or "@" in a for a in args)
    env = {e["name"]: e for e in container["env"]}
    store = env["MLFLOW_BACKEND_STORE_URI"]
    assert store["valueFrom"]["secretKeyRef"]["name"] == "mlflow-server"
    # The installed MLflow takes these options and reads the store from the environment.
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "postgresql://mlflow:pw@postgres:5432/mlflow")
    params = server.make_context("server", list(args)).params
    assert params["backend_store_uri"] == "postgresql://mlflow:pw@postgres:5432/mlflow"
    assert params["app_name"] == "basic-auth"
    # The auth configuration the check reads is the Secret's basic_auth.ini.
    config = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    (mount,) = [m for m in container["volumeMounts"] if config.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "mlflow-server"
    assert volume["secret"]["items"] == [{"key": "basic_auth.ini", "path": config.rsplit("/")[-1]}]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def _ingress_routes(documents: list[dict]) -> dict[str, tuple[str, int]]:
    """path -> (Service, port) of the backend Ingress."""
    (ingress,) = find(documents, "Ingress", BACKEND_INGRESS)
    routes = {}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["pathType"] == "Prefix", path
            service = path["backend"]["service"]
            routes[path["path"]] = (service["name"], service["port"]["number"])
    return routes


def _served_by_our_runtime(documents: list[dict]) -> set[str]:
    """The InferenceServices whose predictor is `contentml serve`: each serves the model named
    like itself, and that model's task route."""
    return {
        d["metadata"]["name"]
        for d in find(documents, "InferenceService")
        if d["spec"]["predictor"]["model"].get("runtime") == "contentml"
    }


def test_the_ingress_sends_each_task_to_the_process_that_serves_it(overlay):
    """A task whose model one of our predictors serves goes to that InferenceService's
    predictor Service; every other backend route (scripts, batch jobs, the schema) to the API."""
    _, documents = overlay
    ours = _served_by_our_runtime(documents)
    (api_service,) = find(documents, "Service", API)
    (api_port,) = [p["port"] for p in api_service["spec"]["ports"]]
    expected = {path: (API, api_port) for path in API_ONLY_PATHS}
    for spec in TASKS.values():
        if spec.model in ours:
            expected[spec.route] = (f"{spec.model}-predictor", PREDICTOR_PORT)
        else:
            expected[spec.route] = (API, api_port)
    assert _ingress_routes(documents) == expected
    # The issue's split: trend and quality on their predictors, scripts on the API.
    assert expected[TASKS[Task.TREND].route][0] == "trend-predictor"
    assert expected[TASKS[Task.QUALITY].route][0] == "quality-predictor"
    assert expected[TASKS[Task.SCRIPT].route][0] == API


def test_every_service_the_ingress_names_is_rendered_or_made_by_kserve(overlay):
    """A backend is a rendered Service that selects a rendered Deployment's pods on a port they
    open, or the predictor Service KServe makes for a rendered InferenceService."""
    _, documents = overlay
    (ingress,) = find(documents, "Ingress", BACKEND_INGRESS)
    namespace = ingress["metadata"]["namespace"]

    def here(kind: str) -> list[dict]:
        return [d for d in find(documents, kind) if d["metadata"].get("namespace") == namespace]

    predictors = {f"{d['metadata']['name']}-predictor" for d in here("InferenceService")}
    services = {d["metadata"]["name"]: d["spec"] for d in here("Service")}
    for name, port in set(_ingress_routes(documents).values()):
        if name in predictors:
            assert port == PREDICTOR_PORT
            continue
        assert name in services, f"the Ingress names {name}, which is not rendered"
        (target,) = [p["targetPort"] for p in services[name]["ports"] if p["port"] == port]
        selector = services[name]["selector"].items()
        pods = [
            _pod(d)
            for d in here("Deployment")
            if selector <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {name} selects no rendered Deployment's pods"
        for pod in pods:
            opened = {
                key
                for c in pod["containers"]
                for p in c.get("ports", [])
                for key in (p.get("name"), p["containerPort"])
            }
            assert target in opened, f"Service {name} sends port {port} to {target}, not opened"


@pytest.mark.parametrize(("name", "command"), [(API, ["api"]), (BATCH_WORKER, ["batch", "worker"])])
def test_the_backend_runs_the_platform_image_with_the_platforms_settings(overlay, name, command):
    """`contentml api` and `contentml batch worker` with every setting and credential by
    reference, on the CPU pool, restricted, with no Kubernetes API access."""
    _, documents = overlay
    (deployment,) = find(documents, "Deployment", name)
    pod = _pod(deployment)
    (container,) = pod["containers"]
    assert "command" not in container  # the image's entrypoint is `contentml`
    assert container["args"][: len(command)] == command
    assert container["envFrom"] == cluster.env_from()
    assert pod["nodeSelector"] == cluster.CPU_NODE_SELECTOR
    context = {**pod["securityContext"], **container["securityContext"]}
    assert cluster.CONTAINER_SECURITY_CONTEXT.items() <= context.items()
    bound = {s["name"] for b in find(documents, "RoleBinding") for s in b["subjects"]}
    assert pod["serviceAccountName"] not in bound
    assert pod["automountServiceAccountToken"] is False


def test_every_pod_has_its_own_ingress_policy_and_egress_is_denied_by_default(overlay):
    """Each namespace with pods denies all traffic, in and out, unless a policy allows it; each
    pod template (the predictors and the TrainJob ranks included) is selected by a policy of its
    own that says who may reach it; every pod may resolve names, and no egress rule is open on
    every port."""
    _, documents = overlay
    assert manifests.network_problems(documents) == []
    pods = [
        (d["metadata"].get("namespace"), labels)
        for d in documents
        for _, labels in manifests.labelled_pods(d)
    ]
    assert {namespace for namespace, _ in pods} == {"contentml", "contentml-system"}
    assert len(pods) == sum(POD_KINDS.values()) - POD_KINDS["ServingRuntime"]
    for namespace, labels in pods:
        egress = manifests.policies_selecting(documents, namespace, labels, "Egress")
        assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("egress") for p in egress)


def _egress_ports(documents: list[dict], kind: str, name: str) -> set[int]:
    """The ports the pods of one object may connect to, over all its egress policies."""
    (document,) = find(documents, kind, name)
    _, labels = next(manifests.labelled_pods(document))  # a TrainingRuntime's two: alike
    namespace = document["metadata"]["namespace"]
    return {
        port["port"]
        for policy in manifests.policies_selecting(documents, namespace, labels, "Egress")
        for rule in policy["spec"].get("egress") or []
        for port in rule["ports"]
    }


MLFLOW_PORT, POSTGRES_PORT, REDIS_PORT, HTTPS_PORT, DNS_PORT = 5000, 5432, 6379, 443, 53


@pytest.mark.parametrize(
    ("kind", "name", "allowed", "denied"),
    [
        # Champions from MLflow and the bucket, features from Redis, rewards in PostgreSQL.
        ("InferenceService", "trend", {MLFLOW_PORT, POSTGRES_PORT, REDIS_PORT, HTTPS_PORT}, set()),
        ("InferenceService", "revenue", {POSTGRES_PORT}, set()),
        # The script model fetches weights over HTTPS and nothing else.
        ("InferenceService", "script", {HTTPS_PORT}, {MLFLOW_PORT, POSTGRES_PORT, REDIS_PORT}),
        ("Deployment", API, {POSTGRES_PORT, REDIS_PORT}, {MLFLOW_PORT, HTTPS_PORT}),
        ("Deployment", BATCH_WORKER, {MLFLOW_PORT, POSTGRES_PORT, REDIS_PORT, HTTPS_PORT}, set()),
        ("Deployment", "feast", {POSTGRES_PORT, REDIS_PORT}, {MLFLOW_PORT, HTTPS_PORT}),
        ("Deployment", "mlflow", {POSTGRES_PORT, HTTPS_PORT}, {REDIS_PORT, MLFLOW_PORT}),
        ("Job", "contentml-schedules", {8888}, {MLFLOW_PORT, POSTGRES_PORT, HTTPS_PORT}),
        ("TrainingRuntime", RUNTIME, {MLFLOW_PORT, HTTPS_PORT}, {POSTGRES_PORT, REDIS_PORT}),
    ],
)
def test_egress_allows_what_each_workload_calls_and_no_more(overlay, kind, name, allowed, denied):
    _, documents = overlay
    ports = _egress_ports(documents, kind, name)
    assert DNS_PORT in ports
    assert allowed <= ports, ports
    assert not denied & ports, ports


INFERENCE_SERVICE_CRD = SCHEMAS_DIR / "kserve" / "serving.kserve.io_inferenceservices.yaml"
KSERVE_TRANSFORMER_ARGS = (
    "--model_name script --predictor_host script-predictor.contentml --http_port 8080"
).split()
"""What KServe appends to a custom transformer's args (its `transformer_custom.go`): the
InferenceService's name, its predictor's Service and KServe's HTTP port."""


def _script_components(documents: list[dict]) -> tuple[dict, dict[str, dict[str, str]]]:
    """The script InferenceService and the labels of its components' pods, by component."""
    (script,) = find(documents, "InferenceService", "script")
    labels = {path.removeprefix("spec."): pod for path, pod in manifests.labelled_pods(script)}
    return script, labels


def test_the_script_endpoint_checks_the_token_in_its_transformer(overlay):
    """The script InferenceService, its transformer included, is valid against KServe's CRD.
    The transformer runs `contentml auth-proxy` in the platform image on the port and with the
    arguments KServe gives it, with the API token as a required key of its Secret and no other
    credential, and drains within its grace period; the predictor never gets the token."""
    _, documents = overlay
    script, labels = _script_components(documents)
    validator = manifests.crd_validator(INFERENCE_SERVICE_CRD, "v1beta1")
    assert [error.message for error in validator.iter_errors(script)] == []
    assert set(labels) == {"predictor", "transformer"}

    transformer = script["spec"]["transformer"]
    (container,) = transformer["containers"]
    assert container["name"] == "kserve-container"  # the name KServe gives it anyway
    assert container["image"].startswith("ghcr.io/contentml/platform")
    args = build_parser().parse_args([*container["args"], *KSERVE_TRANSFORMER_ARGS])
    assert args.handler.__name__ == "cmd_auth_proxy"
    assert [p["containerPort"] for p in container["ports"]] == [args.http_port]
    assert container["readinessProbe"]["httpGet"] == {
        "path": auth_proxy.HEALTH_PATHS[1],
        "port": args.http_port,
    }
    assert container["envFrom"] == cluster.env_from()
    assert [e for e in container["env"] if "valueFrom" in e] == [
        {
            "name": "CONTENTML_API_TOKEN",
            "valueFrom": {
                "secretKeyRef": {"name": cluster.API_TOKEN_SECRET, "key": "CONTENTML_API_TOKEN"}
            },
        }
    ]
    predictor_env = {e["name"] for e in script["spec"]["predictor"]["model"]["env"]}
    assert "CONTENTML_API_TOKEN" not in predictor_env
    # No Kubernetes API and no storage credentials.
    assert transformer["serviceAccountName"] == "contentml-worker"
    assert transformer["automountServiceAccountToken"] is False
    (config_map,) = find(documents, "ConfigMap", cluster.SETTINGS_CONFIG_MAP)
    settings = Settings.from_env(config_map["data"])
    stops = settings.shutdown_drain_seconds + settings.shutdown_grace_seconds
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert transformer["terminationGracePeriodSeconds"] > pre_stop + stops


Source = tuple[str, dict[str, str], dict[str, str]]
"""A calling pod: its namespace, that namespace's labels, its own labels."""


def _admits(documents: list[dict], target: tuple[str, dict], source: Source, port: int) -> bool:
    """Whether the NetworkPolicies of `documents` let a pod of `source` connect to the pods of
    `target` (their namespace and labels) on `port`."""
    namespace, labels = target
    source_namespace, namespace_labels, source_labels = source

    def peer_admits(peer: dict) -> bool:
        if "ipBlock" in peer:
            return False
        if "namespaceSelector" in peer:
            if not manifests.selects(peer["namespaceSelector"], namespace_labels):
                return False
        elif source_namespace != namespace:
            return False  # a bare podSelector selects pods of the policy's own namespace
        return "podSelector" not in peer or manifests.selects(peer["podSelector"], source_labels)

    return any(
        ("from" not in rule or any(peer_admits(peer) for peer in rule["from"]))
        and ("ports" not in rule or any(p["port"] == port for p in rule["ports"]))
        for policy in manifests.policies_selecting(documents, namespace, labels, "Ingress")
        for rule in policy["spec"].get("ingress") or []
    )


PLATFORM_NAMESPACE = {"kubernetes.io/metadata.name": "contentml", "contentml.io/platform": "true"}
SOURCES: dict[str, Source] = {
    "transformer": ("contentml", PLATFORM_NAMESPACE, {}),  # its labels: the rendered ones
    "api": ("contentml", PLATFORM_NAMESPACE, {"app.kubernetes.io/name": API}),
    "batch-worker": ("contentml", PLATFORM_NAMESPACE, {"app.kubernetes.io/name": BATCH_WORKER}),
    "trend-predictor": (
        "contentml",
        PLATFORM_NAMESPACE,
        {manifests.KSERVE_POD_LABEL: "trend", manifests.KSERVE_COMPONENT_LABEL: "predictor"},
    ),
    "ingress-controller": ("ingress-nginx", {"contentml.io/ingress": "true"}, {}),
    "knative-gateway": ("knative-serving", {"contentml.io/serving-gateway": "true"}, {}),
    "another-namespace": ("default", {"kubernetes.io/metadata.name": "default"}, {}),
}
"""Who might call the script endpoint's pods: its transformer, the platform's pods, the
Ingress controller, Knative's activator and gateways, and a pod of a namespace not ours."""
RUNTIME_PORT, QUEUE_PROXY_PORT = 8080, 8012
"""A KServe pod's server port (RawDeployment) and Knative's queue-proxy's (Knative)."""


@pytest.mark.parametrize(
    ("source", "to_predictor", "to_transformer"),
    [
        # Only the token check reaches the predictor directly (and, as a platform pod, the
        # transformer too).
        ("transformer", {RUNTIME_PORT, QUEUE_PROXY_PORT}, {RUNTIME_PORT, QUEUE_PROXY_PORT}),
        # Callers reach the transformer, as they reached the predictor before.
        ("api", set(), {RUNTIME_PORT, QUEUE_PROXY_PORT}),
        ("batch-worker", set(), {RUNTIME_PORT, QUEUE_PROXY_PORT}),
        ("trend-predictor", set(), {RUNTIME_PORT, QUEUE_PROXY_PORT}),
        ("ingress-controller", set(), {RUNTIME_PORT, QUEUE_PROXY_PORT}),
        # In Knative mode the transformer's calls arrive through the activator and gateways,
        # on queue-proxy's port (network-policies.yaml says what this leaves open).
        ("knative-gateway", {QUEUE_PROXY_PORT}, {RUNTIME_PORT, QUEUE_PROXY_PORT}),
        ("another-namespace", set(), set()),
    ],
)
def test_only_the_transformer_reaches_the_script_predictor(
    overlay, source, to_predictor, to_transformer
):
    _, documents = overlay
    script, labels = _script_components(documents)
    namespace = script["metadata"]["namespace"]
    caller = SOURCES[source]
    if source == "transformer":
        caller = (namespace, caller[1], labels["transformer"])
    ports = {RUNTIME_PORT, QUEUE_PROXY_PORT}
    predictor = (namespace, labels["predictor"])
    transformer = (namespace, labels["transformer"])
    assert {p for p in ports if _admits(documents, predictor, caller, p)} == to_predictor
    assert {p for p in ports if _admits(documents, transformer, caller, p)} == to_transformer


def test_the_script_transformer_calls_only_its_predictor(overlay):
    """Out of the transformer: its predictor (directly, or through Knative's gateways) and DNS,
    nothing else: no database, no bucket, no hub."""
    _, documents = overlay
    script, labels = _script_components(documents)
    namespace = script["metadata"]["namespace"]
    rules = [
        rule
        for policy in manifests.policies_selecting(
            documents, namespace, labels["transformer"], "Egress"
        )
        for rule in policy["spec"].get("egress") or []
    ]
    ports = {port["port"] for rule in rules for port in rule["ports"]}
    assert ports == {DNS_PORT, RUNTIME_PORT, QUEUE_PROXY_PORT, 80, 8081}
    for rule in rules:
        for peer in rule["to"]:
            if "podSelector" in peer and "namespaceSelector" not in peer:
                assert manifests.selects(peer["podSelector"], labels["predictor"])
                assert not manifests.selects(peer["podSelector"], labels["transformer"])


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda docs: [d for d in docs if d["metadata"]["name"] != "predictors"],
            "InferenceService contentml/trend: spec.predictor: no NetworkPolicy selects its pods",
        ),
        (
            lambda docs: [
                d
                for d in docs
                if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "default-deny")
            ],
            "namespace contentml: no default-deny NetworkPolicy",
        ),
        (
            lambda docs: [d for d in docs if d["metadata"]["name"] != "dns"],
            "Deployment contentml/feast: spec.template.spec: no egress policy allows DNS",
        ),
        (
            lambda docs: [
                _open_egress(d) if d["metadata"]["name"] == "feast-egress" else d for d in docs
            ],
            "NetworkPolicy contentml/feast-egress: spec.egress[1] allows every port",
        ),
    ],
)
def test_the_network_check_names_what_is_left_open(prod, change, problem):
    problems = manifests.network_problems(change(copy.deepcopy(prod)))
    assert any(line.startswith(problem) for line in problems), problems


def _open_egress(policy: dict) -> dict:
    policy["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    return policy


def test_the_api_is_probed_on_its_health_routes_and_reached_from_the_ingress(overlay):
    _, documents = overlay
    (deployment,) = find(documents, "Deployment", API)
    (container,) = _pod(deployment)["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    (port,) = container["ports"]
    (policy,) = find(documents, "NetworkPolicy", API)
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}]
    assert {"namespaceSelector": {"matchLabels": {"contentml.io/platform": "true"}}} in rule["from"]
    assert {"namespaceSelector": {"matchLabels": {"contentml.io/ingress": "true"}}} in rule["from"]


def test_batch_workers_open_no_port_and_finish_their_chunk_on_sigterm(overlay):
    _, documents = overlay
    (deployment,) = find(documents, "Deployment", BATCH_WORKER)
    pod = _pod(deployment)
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert not any(c.get("ports") for c in pod["containers"])
    (policy,) = find(documents, "NetworkPolicy", BATCH_WORKER)
    assert policy["spec"]["policyTypes"] == ["Ingress"] and not policy["spec"].get("ingress")


def test_serving_pods_wait_for_routing_then_drain_within_their_grace_period(overlay):
    """Predictors on our runtime and the API: a preStop sleep (endpoints stop routing), then
    the server's own drain and grace (settings), all inside terminationGracePeriodSeconds."""
    _, documents = overlay
    (config_map,) = find(documents, "ConfigMap", cluster.SETTINGS_CONFIG_MAP)
    settings = Settings.from_env(config_map["data"])
    server_stops = settings.shutdown_drain_seconds + settings.shutdown_grace_seconds
    (runtime,) = find(documents, "ServingRuntime", "contentml")
    (container,) = runtime["spec"]["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    ours = [
        isvc["spec"]["predictor"]
        for isvc in find(documents, "InferenceService")
        if isvc["spec"]["predictor"]["model"].get("runtime") == "contentml"
    ]
    assert ours
    for predictor in ours:
        assert predictor["terminationGracePeriodSeconds"] > pre_stop + server_stops
    (api,) = find(documents, "Deployment", "contentml-api")
    pod = _pod(api)
    (api_container,) = pod["containers"]
    api_pre_stop = api_container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > api_pre_stop + settings.shutdown_grace_seconds


def test_predictors_take_no_batch_items(overlay):
    """Every predictor pod is `contentml serve --workers 0`: batch items are the workers'."""
    _, documents = overlay
    (runtime,) = find(documents, "ServingRuntime", "contentml")
    (container,) = runtime["spec"]["containers"]
    args = container["args"]
    assert args[0] == "serve" and "--workers" in args, args
    assert args[args.index("--workers") + 1] == "0"


@pytest.mark.parametrize(
    ("kind", "name"),
    [("Deployment", API), ("Deployment", BATCH_WORKER), ("ServingRuntime", "contentml")],
)
def test_the_backend_pods_run_commands_the_cli_accepts(prod, kind, name):
    (document,) = find(prod, kind, name)
    spec = document["spec"] if kind == "ServingRuntime" else _pod(document)
    # KServe puts the InferenceService's name in `{{.Name}}`.
    args = [a.replace("{{.Name}}", "trend") for a in spec["containers"][0]["args"]]
    try:
        build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{kind} {name}: `contentml {' '.join(args)}` does not parse")


def test_prod_runs_two_of_each_backend_process_and_drains_one_at_a_time(prod):
    for name in (API, BATCH_WORKER):
        (deployment,) = find(prod, "Deployment", name)
        assert deployment["spec"]["replicas"] == 2
        labels = deployment["spec"]["template"]["metadata"]["labels"].items()
        budgets = [
            b["spec"]
            for b in find(prod, "PodDisruptionBudget")
            if b["metadata"]["namespace"] == deployment["metadata"]["namespace"]
            and b["spec"]["selector"]["matchLabels"].items() <= labels
        ]
        assert [b["maxUnavailable"] for b in budgets] == [1], name


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
            "Deployment",
            API,
            lambda d: _pod(d)["containers"][0]["envFrom"].append(
                {"secretRef": {"name": cluster.CREDENTIALS_SECRET}}
            ),
            "takes the whole Secret contentml-credentials",
        ),
        (
            "Deployment",
            API,
            lambda d: [
                e["valueFrom"]["secretKeyRef"].update(optional=True)
                for e in _pod(d)["containers"][0]["env"]
                if e["name"] == "CONTENTML_API_TOKEN"
            ],
            "CONTENTML_API_TOKEN is an optional key",
        ),
        (
            "InferenceService",
            "quality",
            lambda d: d["spec"]["predictor"]["securityContext"].update(runAsUser=0),
            "may run as root",
        ),
        # The script model's transformer is checked like a predictor: its schema, its token.
        (
            "InferenceService",
            "script",
            lambda d: d["spec"]["transformer"]["containers"][0].update(arg=["auth-proxy"]),
            "'arg' was unexpected",
        ),
        (
            "InferenceService",
            "script",
            lambda d: d["spec"]["transformer"]["containers"][0]["env"][0]["valueFrom"][
                "secretKeyRef"
            ].update(optional=True),
            "CONTENTML_API_TOKEN is an optional key",
        ),
    ],
)
def test_the_check_names_a_broken_object(prod, kind, name, change, problem):
    document = broken(prod, kind, name, change)
    found = (
        manifests.schema_problems(document, SCHEMAS_DIR)
        + manifests.secret_problems(document)
        + manifests.root_problems(document)
        + manifests.restricted_problems(document)
    )
    assert any(problem in line for line in found), found


POD_KINDS = {
    "Deployment": 4,
    "Job": 1,
    "ServingRuntime": 1,
    "InferenceService": 6,
    "TrainingRuntime": 2,
}
"""Pod templates per kind in each overlay: the four servers' Deployments, the schedules Job, our
runtime, the five predictors and the script model's transformer, the DeepSpeed runtime's node
and launcher."""


def test_every_pod_of_every_overlay_is_restricted(overlay):
    _, documents = overlay
    pods: Counter[str] = Counter()
    for document in documents:
        assert manifests.restricted_problems(document) == []
        pods[document["kind"]] += len(list(manifests.pod_templates(document)))
    assert dict(pods - Counter()) == POD_KINDS
    # The MLflow namespace admits only restricted pods; `contentml` warns (KServe's and
    # Knative's injected containers are the cluster's, not ours).
    labels = {d["metadata"]["name"]: d["metadata"]["labels"] for d in find(documents, "Namespace")}
    assert labels["contentml-system"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["contentml"]["pod-security.kubernetes.io/warn"] == "restricted"


def test_read_only_containers_write_to_empty_dirs(overlay):
    """Each pod that runs our code mounts an emptyDir on /tmp (CONTENTML_HOME, caches) and on
    the HOME it sets; a predictor of our runtime gets the runtime's."""
    _, documents = overlay
    settings = manifests.MANIFESTS_DIR / "base" / "platform" / "settings.env"
    assert "CONTENTML_HOME=/tmp/contentml" in settings.read_text().splitlines()
    for document in documents:
        for pod in manifests.pod_templates(document):
            if pod.spec.get("model", {}).get("runtime") == "contentml":
                continue
            empty = {v["name"] for v in pod.spec.get("volumes", []) if "emptyDir" in v}
            for path, container in pod.containers:
                mounted = container.get("volumeMounts", [])
                mounts = {m["mountPath"] for m in mounted if m["name"] in empty}
                where = f"{document['kind']} {document['metadata']['name']}: {path}"
                assert "/tmp" in mounts, where
                homes = [e["value"] for e in container.get("env", []) if e["name"] == "HOME"]
                for home in homes:
                    assert any(home == m or home.startswith(m + "/") for m in mounts), where


def test_training_pods_run_sshd_restricted(overlay):
    """sshd as uid 1000 on an unprivileged port, with no capability; its HOME (PidFile, the
    ranks' caches) an emptyDir over which Trainer mounts the ssh keys."""
    _, documents = overlay
    (runtime,) = find(documents, "TrainingRuntime", RUNTIME)
    mpi = runtime["spec"]["mlPolicy"]["mpi"]
    home = mpi["sshAuthMountPath"].rsplit("/", 1)[0]
    for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        pod = job["template"]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == cluster.RUN_AS_USER
        (container,) = pod["containers"]
        assert "add" not in container["securityContext"]["capabilities"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[home]]
        assert volume["emptyDir"] == {}
        if job["name"] == "node":
            assert container["command"] == ["/usr/sbin/sshd"]
            config = container["args"][container["args"].index("-f") + 1]
            assert not config.startswith(home + "/"), "the emptyDir on HOME would hide it"
            assert container["readinessProbe"]["tcpSocket"]["port"] > 1024


def restricted_deployment() -> dict:
    """A Deployment whose one pod passes every rule, shaped like the overlays' own."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "contentml"},
        "spec": {
            "template": {
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "app",
                            "image": "ghcr.io/contentml/platform:0.1.0",
                            "resources": {
                                "requests": {"cpu": "1", "memory": "1Gi"},
                                "limits": {"memory": "1Gi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                            },
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                }
            }
        },
    }


def _context(pod: dict) -> dict:
    return pod["containers"][0]["securityContext"]


def _job_pod(runtime: dict, index: int) -> dict:
    return runtime["spec"]["template"]["spec"]["replicatedJobs"][index]["template"]["spec"][
        "template"
    ]["spec"]


POD = "spec.template.spec"
APP = "spec.template.spec.containers[0] ('app')"

BREAKS: dict[Rule, tuple[Callable[[dict], object], str]] = {
    Rule.HOST_PROCESS: (lambda p: _context(p).update(windowsOptions={"hostProcess": True}), APP),
    Rule.HOST_NAMESPACES: (lambda p: p.update(hostPID=True), POD),
    Rule.PRIVILEGED: (lambda p: _context(p).update(privileged=True), APP),
    Rule.CAPABILITIES: (lambda p: _context(p)["capabilities"]["add"].append("SYS_ADMIN"), APP),
    Rule.HOST_PATH: (
        lambda p: p["volumes"].append({"name": "docker", "hostPath": {"path": "/var/run"}}),
        POD,
    ),
    Rule.HOST_PORTS: (
        lambda p: p["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]),
        APP,
    ),
    Rule.APPARMOR: (lambda p: _context(p).update(appArmorProfile={"type": "Unconfined"}), APP),
    Rule.SELINUX: (lambda p: _context(p).update(seLinuxOptions={"type": "spc_t"}), APP),
    Rule.PROC_MOUNT: (lambda p: _context(p).update(procMount="Unmasked"), APP),
    Rule.SECCOMP: (lambda p: _context(p).update(seccompProfile={"type": "Unconfined"}), APP),
    Rule.SYSCTLS: (
        lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
        POD,
    ),
    Rule.VOLUME_TYPES: (
        lambda p: p["volumes"].append({"name": "nfs", "nfs": {"server": "nas", "path": "/"}}),
        POD,
    ),
    Rule.PRIVILEGE_ESCALATION: (lambda p: _context(p).update(allowPrivilegeEscalation=True), APP),
    Rule.RUN_AS_NON_ROOT: (lambda p: _context(p).update(runAsNonRoot=False), APP),
    Rule.RUN_AS_NON_ROOT_USER: (lambda p: _context(p).update(runAsUser=0), APP),
    Rule.RESOURCES: (lambda p: p["containers"][0]["resources"].pop("limits"), APP),
    Rule.READ_ONLY_ROOT: (lambda p: _context(p).pop("readOnlyRootFilesystem"), APP),
}
"""Each rule broken in the smallest way, and where the report must say it is."""


def _rules(problems: list[str]) -> set[Rule]:
    return {rule for rule in Rule for line in problems if f": {rule.value}: " in line}


def test_the_restricted_deployment_passes_and_every_rule_has_a_break():
    assert manifests.restricted_problems(restricted_deployment()) == []
    assert set(BREAKS) == set(Rule)


@pytest.mark.parametrize("rule", list(Rule), ids=lambda r: r.name.lower())
def test_each_broken_rule_is_reported_with_the_container_and_the_rule(rule):
    document = restricted_deployment()
    change, where = BREAKS[rule]
    change(_pod(document))
    problems = manifests.restricted_problems(document)
    assert problems, rule
    assert _rules(problems) == {rule}, problems
    for line in problems:
        assert line.startswith(f"Deployment contentml/web: {where}: {rule.value}: "), line


@pytest.mark.parametrize(
    ("change", "rule", "where"),
    [
        # Missing, not wrong: the profile wants each of them said.
        (lambda p: _context(p)["capabilities"].pop("drop"), Rule.CAPABILITIES, APP),
        (lambda p: p["securityContext"].pop("seccompProfile"), Rule.SECCOMP, APP),
        (lambda p: p["securityContext"].pop("runAsNonRoot"), Rule.RUN_AS_NON_ROOT, APP),
        (lambda p: _context(p).pop("allowPrivilegeEscalation"), Rule.PRIVILEGE_ESCALATION, APP),
        (lambda p: p["securityContext"].update(runAsUser=0), Rule.RUN_AS_NON_ROOT_USER, POD),
        # A pod-level setting the containers override is still refused.
        (lambda p: p["securityContext"].update(runAsNonRoot=False), Rule.RUN_AS_NON_ROOT, POD),
        (
            lambda p: p["securityContext"].update(seccompProfile={"type": "Unconfined"}),
            Rule.SECCOMP,
            POD,
        ),
        # Init containers are held to the same rules.
        (
            lambda p: p.update(initContainers=[{"name": "init", "securityContext": {}}]),
            Rule.PRIVILEGE_ESCALATION,
            "spec.template.spec.initContainers[0] ('init')",
        ),
    ],
)
def test_a_missing_setting_is_reported_too(change, rule, where):
    document = restricted_deployment()
    change(_pod(document))
    problems = manifests.restricted_problems(document)
    assert any(line.startswith(f"Deployment contentml/web: {where}: {rule.value}: ")
               for line in problems), problems  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "name", "change", "where", "rule"),
    [
        (
            "ServingRuntime",
            "contentml",
            lambda d: d["spec"]["containers"][0]["securityContext"].pop("seccompProfile"),
            "spec.containers[0] ('kserve-container')",
            Rule.SECCOMP,
        ),
        (
            "ServingRuntime",
            "contentml",
            lambda d: d["spec"].update(hostIPC=True),
            "spec",
            Rule.HOST_NAMESPACES,
        ),
        (
            "InferenceService",
            "trend",
            lambda d: d["spec"]["predictor"]["model"]["securityContext"]["capabilities"].pop(
                "drop"
            ),
            "spec.predictor.model ('kserve-container')",
            Rule.CAPABILITIES,
        ),
        (
            "InferenceService",
            "script",
            lambda d: d["spec"]["predictor"]["volumes"].append(
                {"name": "cache", "hostPath": {"path": "/data"}}
            ),
            "spec.predictor",
            Rule.HOST_PATH,
        ),
        (
            "TrainingRuntime",
            RUNTIME,
            lambda d: _context(_job_pod(d, 0))["capabilities"].update(add=["SYS_PTRACE"]),
            "spec.template.spec.replicatedJobs[0].template.spec.template.spec.containers[0]"
            " ('node')",
            Rule.CAPABILITIES,
        ),
        (
            "TrainJob",
            "finetune-a100x16",
            lambda d: d["spec"]["trainer"]["resourcesPerNode"].pop("limits"),
            "spec.trainer.resourcesPerNode",
            Rule.RESOURCES,
        ),
    ],
)
def test_every_kind_of_pod_template_is_checked(prod, kind, name, change, where, rule):
    document = broken(prod, kind, name, change)
    problems = manifests.restricted_problems(document)
    prefix = f"{kind} contentml/{name}: {where}: {rule.value}: "
    assert any(line.startswith(prefix) for line in problems), problems


def test_a_secret_with_values_and_an_unknown_kind_are_refused():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"k": ""}}
    assert "carries secret values" in manifests.secret_problems(secret)[0]
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {}}
    assert "no schema for" in manifests.schema_problems(rule, SCHEMAS_DIR)[0]


def test_make_manifests_reports_each_overlay(tmp_path, monkeypatch, capsys):
    settings = make_settings(tmp_path)
    status, out, err = cli(
        settings, monkeypatch, capsys, "manifests", "check", "--schemas", str(SCHEMAS_DIR)
    )
    assert status == 0, out + err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(manifests.OVERLAYS)
    assert all(re.fullmatch(r"\w+: \d+ objects valid \(.*InferenceService 5.*\)", x) for x in lines)


def test_a_release_check_requires_every_image_pinned_by_digest(tmp_path, monkeypatch, capsys):
    args = ("--overlay", "dev", "--schemas", str(SCHEMAS_DIR), "--require-digests")
    status, out, err = cli(
        make_settings(tmp_path), monkeypatch, capsys, "manifests", "check", *args
    )
    assert status == 1, out + err
    assert "image ghcr.io/contentml/platform:0.1.0 is not pinned by digest" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--overlay", "staging"], "no overlay 'staging'"),
        (["--schemas", "/nonexistent"], "no kserve/ and kubeflow-trainer/ CRD folders"),
    ],
)
def test_bad_requests_exit_2(tmp_path, args, message, monkeypatch, capsys):
    status, _, err = cli(make_settings(tmp_path), monkeypatch, capsys, "manifests", "check", *args)
    assert status == 2 and message in err


def test_without_kubectl_the_error_says_so(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ManifestError, match="kubectl not found"):
        manifests.render(manifests.overlay_dir("dev"))


def test_the_clusters_script_chain_calls_the_script_endpoint_with_the_token(overlay):
    """The API's and workers' chain (settings.env's CONTENTML_SCRIPT_PROVIDERS, a path in the
    image) reaches the `script` InferenceService, whose transformer wants the callers' token,
    and sends that token; CONTENTML_SERVING_URL names the quality predictor, not it."""
    _, documents = overlay
    settings_env = manifests.MANIFESTS_DIR / "base" / "platform" / "settings.env"
    values = dict(
        line.split("=", 1) for line in settings_env.read_text().splitlines() if "=" in line
    )
    in_image = values["CONTENTML_SCRIPT_PROVIDERS"].removeprefix("/app/")
    hosted, ours = providers_config.load_config(manifests.MANIFESTS_DIR.parent / in_image).providers
    # The hosted API first, its keys from the optional Secret; our model the fallback.
    assert hosted.api_key_env == "OPENAI_API_KEYS"
    assert cluster.WORKLOAD_CREDENTIALS[cluster.Workload.API]["OPENAI_API_KEYS"] == (
        cluster.PROVIDER_KEYS_SECRET
    )
    (script,) = find(documents, "InferenceService", "script")
    namespace = script["metadata"].get("namespace", "contentml")
    assert "transformer" in script["spec"]
    assert ours.base_url == f"http://script.{namespace}.svc.cluster.local/openai/v1"
    assert ours.api_key_env == "CONTENTML_API_TOKEN"
    for name in ("contentml-api", "contentml-batch-worker"):
        (deployment,) = find(documents, "Deployment", name)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert "optional" not in env["CONTENTML_API_TOKEN"]["valueFrom"]["secretKeyRef"], name
