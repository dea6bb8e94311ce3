"""The InferenceService manifests against KServe's CRD schema, rendered from a real SQLite
registry: the champion serves, the challenger takes the canary, promote and rollback re-render."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import mlflow
import pytest
import yaml

from contentml import registry
from contentml.errors import UserError
from contentml.registry import Alias, RegistryError
from entrypoints import deploy
from entrypoints.deploy import DeployError, Mode
from entrypoints.manifests import crd_validator
from tests.conftest import SCHEMAS_DIR, make_settings, run_cli
from tests.helpers.registry import Constant, register_versions

CRD = SCHEMAS_DIR / "kserve" / "serving.kserve.io_inferenceservices.yaml"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    return crd_validator(CRD, "v1beta1")


def errors(validator: jsonschema.Validator, manifest: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]


def with_aliases(settings, name: str, versions: list[str]) -> None:
    """First version champion, last challenger, through the registry's own functions."""
    client = registry.connect(settings)
    registry.promote(client, name, versions[0], reason="first")
    registry.promote(client, name, versions[-1], Alias.CHALLENGER, reason="trained")


def register_script_versions(settings, count: int, weights: Path) -> list[str]:
    """Script pyfuncs carrying a (fake) merged model folder under the artifact key that
    `training.llm.package.log_script_model` uses."""
    weights.mkdir(parents=True, exist_ok=True)
    (weights / "config.json").write_text('{"model_type": "llama"}')
    (weights / "tokenizer_config.json").write_text("{}")
    client = registry.connect(settings)
    versions = []
    for _ in range(count):
        with mlflow.start_run(experiment_id=registry.experiment_id(client, settings)):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=Constant(),
                artifacts={deploy.SCRIPT_WEIGHTS_ARTIFACT: str(weights)},
                registered_model_name="script",
            )
        versions.append(str(info.registered_model_version))
    return versions


@pytest.fixture(scope="module")
def trend(tmp_path_factory):
    """`trend` v1 champion, v2 challenger (read-only: tests that move aliases make their own)."""
    settings = make_settings(tmp_path_factory.mktemp("deploy") / "state")
    versions = register_versions(settings, "trend", 2)
    with_aliases(settings, "trend", versions)
    return settings, versions


@pytest.fixture
def fresh_trend(tmp_path):
    settings = make_settings(tmp_path / "state")
    versions = register_versions(settings, "trend", 2)
    with_aliases(settings, "trend", versions)
    return settings, versions


def env(predictor: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in predictor["model"]["env"]}


def served(predictor: dict) -> tuple[str, str]:
    """(version, pinned versions) of one of our predictors."""
    values = env(predictor)
    return values[deploy.VERSION_ENV], values[deploy.PINNED_ENV]


def base_template(model: str) -> dict:
    (found,) = [
        d
        for d in yaml.safe_load_all(deploy.SERVING_MANIFESTS.read_text())
        if d["metadata"]["name"] == model
    ]
    return found


def version_uri(settings, name: str, version: str) -> str:
    return registry.connect(settings).get_model_version_download_uri(name, version)


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("canary", [0, 25, 100])
def test_manifests_validate_against_the_inferenceservice_crd(trend, validator, mode, canary):
    settings, _ = trend
    manifest = deploy.deploy_manifest(settings, "trend", canary, mode, "ml")
    assert errors(validator, manifest) == []
    assert (manifest["apiVersion"], manifest["kind"]) == (
        "serving.kserve.io/v1beta1",
        "InferenceService",
    )
    assert manifest["metadata"]["namespace"] == "ml"


@pytest.mark.parametrize(
    ("mode", "path", "value"),
    [
        (Mode.RAW, ("spec", "canary", 0, "trafficPercent"), 150),
        (Mode.RAW, ("spec", "canary", 0, "trafficPercnt"), 25),  # misspelt: the server drops it
        (Mode.RAW, ("spec", "canary", 0, "predictor", "model", "storageUrl"), "s3://x"),
        (Mode.SERVERLESS, ("spec", "predictor", "canaryTrafficPercent"), "25"),
        (Mode.SERVERLESS, ("spec", "predictor", "model", "env", 0), {"value": "x"}),
    ],
)
def test_the_schema_check_catches_a_broken_manifest(trend, validator, mode, path, value):
    manifest = copy.deepcopy(deploy.deploy_manifest(trend[0], "trend", 25, mode))
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert errors(validator, manifest)


def test_serverless_canary_is_the_predictor_with_canary_traffic_percent(trend):
    settings, (v1, v2) = trend
    manifest = deploy.deploy_manifest(settings, "trend", 25, Mode.SERVERLESS)
    spec = manifest["spec"]
    assert "canary" not in spec
    # The challenger is the new revision; KServe routes the other 75 % to the last revision
    # rolled out at 100 %: the champion's.
    assert spec["predictor"]["canaryTrafficPercent"] == 25
    assert served(spec["predictor"]) == (v2, f"trend={v2}")
    assert spec["predictor"]["labels"] == {"contentml/version": v2}
    assert "name" not in spec["predictor"]
    assert manifest["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Knative"}


def test_raw_canary_is_a_named_entry_of_spec_canary(trend):
    settings, (v1, v2) = trend
    manifest = deploy.deploy_manifest(settings, "trend", 25, Mode.RAW)
    spec = manifest["spec"]
    assert "canaryTrafficPercent" not in spec["predictor"]
    assert spec["predictor"]["name"] == f"v{v1}"
    assert served(spec["predictor"]) == (v1, f"trend={v1}")
    (canary,) = spec["canary"]
    assert canary["trafficPercent"] == 25
    assert canary["predictor"]["name"] == f"v{v2}"
    assert served(canary["predictor"]) == (v2, f"trend={v2}")
    # KServe refuses autoscaling fields on a canary; the stable predictor has the template's,
    # less Knative's concurrency target (a RawDeployment's HPA scales on CPU).
    assert not set(deploy.AUTOSCALING_FIELDS) & set(canary["predictor"])
    stable = spec["predictor"]
    assert (stable["minReplicas"], stable["maxReplicas"]) == (1, 4)
    assert "scaleMetric" not in stable and "scaleTarget" not in stable
    assert manifest["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Standard"}


@pytest.mark.parametrize("mode", list(Mode))
def test_each_predictor_is_pinned_to_its_version(trend, mode):
    """Our predictors load their version from the registry: no storage URI, no download."""
    settings, versions = trend
    manifest = deploy.deploy_manifest(settings, "trend", 10, mode)
    predictors = [manifest["spec"]["predictor"]] + [
        c["predictor"] for c in manifest["spec"].get("canary", [])
    ]
    for predictor in predictors:
        version, pinned = served(predictor)
        assert pinned == f"trend={version}"
        assert "storageUri" not in predictor["model"]
    expected = {versions[1]} if mode is Mode.SERVERLESS else set(versions)
    assert {served(p)[0] for p in predictors} == expected


@pytest.mark.parametrize("mode", list(Mode))
def test_no_canary_serves_the_champion_alone(trend, mode):
    settings, (v1, _) = trend
    manifest = deploy.deploy_manifest(settings, "trend", 0, mode)
    spec = manifest["spec"]
    assert "canary" not in spec
    # `canaryTrafficPercent: 0` would pin all traffic to the previous revision: left out.
    assert "canaryTrafficPercent" not in spec["predictor"]
    assert served(spec["predictor"])[0] == v1
    assert manifest["metadata"]["labels"] == {
        "app.kubernetes.io/part-of": "contentml",
        "contentml/model": "trend",
        "contentml/champion-version": v1,
    }


def test_the_predictor_is_the_templates_with_its_version(trend):
    """Runtime, resources, autoscaling and security come from manifests/; deploy adds only
    the version. Settings reach the pod from the cluster's ConfigMap, not the manifest."""
    settings, (v1, v2) = trend
    template = base_template("trend")["spec"]["predictor"]
    predictor = deploy.deploy_manifest(settings, "trend", 0)["spec"]["predictor"]
    assert predictor["model"]["runtime"] == "contentml"
    assert predictor["model"]["modelFormat"] == {"name": "contentml"}
    assert predictor["model"]["resources"] == template["model"]["resources"]
    for key in ("serviceAccountName", "securityContext", "scaleMetric", "scaleTarget"):
        assert predictor[key] == template[key]
    assert env(predictor) == {deploy.VERSION_ENV: v1, deploy.PINNED_ENV: f"trend={v1}"}
    assert settings.home.as_posix() not in str(predictor)


def test_an_overlay_shapes_the_manifest(trend):
    settings, (v1, _) = trend
    prod = deploy.deploy_manifest(settings, "trend", 0, overlay="prod")
    assert prod["spec"]["predictor"]["minReplicas"] == 2
    assert prod["metadata"]["namespace"] == "contentml"
    assert served(prod["spec"]["predictor"]) == (v1, f"trend={v1}")
    dev = deploy.deploy_manifest(settings, "trend", 0, namespace="ml", overlay="dev")
    assert dev["metadata"]["namespace"] == "ml" and dev["spec"]["predictor"]["minReplicas"] == 0
    with pytest.raises(UserError, match="no overlay 'staging'"):
        deploy.deploy_manifest(settings, "trend", 0, overlay="staging")


def test_labels_name_champion_and_challenger(trend):
    settings, (v1, v2) = trend
    labels = deploy.deploy_manifest(settings, "trend", 5)["metadata"]["labels"]
    assert labels["contentml/model"] == "trend"
    assert (labels["contentml/champion-version"], labels["contentml/challenger-version"]) == (
        v1,
        v2,
    )


@pytest.mark.parametrize("mode", list(Mode))
def test_promote_then_rollback_rerender_from_the_aliases(fresh_trend, validator, mode):
    settings, (v1, v2) = fresh_trend
    before = deploy.deploy_manifest(settings, "trend", 0, mode)
    canary = deploy.deploy_manifest(settings, "trend", 20, mode)

    event, promoted = deploy.promote(settings, "trend", mode)
    assert (event.alias, event.from_version, event.to_version) == ("champion", v1, v2)
    assert promoted == deploy.deploy_manifest(settings, "trend", 0, mode)
    assert errors(validator, promoted) == []
    spec = promoted["spec"]
    assert "canary" not in spec and "canaryTrafficPercent" not in spec["predictor"]
    assert served(spec["predictor"]) == (v2, f"trend={v2}")
    assert promoted["metadata"]["labels"]["contentml/champion-version"] == v2
    assert "contentml/challenger-version" not in promoted["metadata"]["labels"]
    if mode is Mode.RAW:
        # The stable predictor takes the canary's name and model: KServe retargets its route
        # to the canary's Deployment instead of starting a new one.
        (entry,) = canary["spec"]["canary"]
        assert spec["predictor"]["name"] == entry["predictor"]["name"] == f"v{v2}"
        assert spec["predictor"]["model"] == entry["predictor"]["model"]
    else:
        # The same predictor as the canary's revision, now taking all the traffic.
        assert served(spec["predictor"]) == served(canary["spec"]["predictor"])

    event, rolled_back = deploy.rollback(settings, "trend", mode)
    assert (event.from_version, event.to_version) == (v2, v1)
    assert served(rolled_back["spec"]["predictor"])[0] == v1
    # Same aliases, same manifest: the champion's manifest from before the canary.
    assert rolled_back == before


def test_script_uses_the_hugging_face_runtime_on_the_merged_weights(tmp_path, validator):
    settings = make_settings(tmp_path / "state")
    versions = register_script_versions(settings, 2, tmp_path / "merged")
    with_aliases(settings, "script", versions)
    for mode in Mode:
        manifest = deploy.deploy_manifest(settings, "script", 10, mode)
        assert errors(validator, manifest) == []
        # The token check comes along: applying a manifest without it would remove it.
        template = deploy.template("script")["spec"]["transformer"]
        transformer = manifest["spec"]["transformer"]
        assert transformer["containers"] == template["containers"]
        assert transformer["containers"][0]["args"] == ["auth-proxy"]
        assert ("scaleMetric" in transformer) is (mode is Mode.SERVERLESS)
        predictors = [manifest["spec"]["predictor"]] + [
            c["predictor"] for c in manifest["spec"].get("canary", [])
        ]
        for predictor in predictors:
            assert "containers" not in predictor
            model = predictor["model"]
            assert model["modelFormat"] == {"name": "huggingface"}
            # The merged weights replace the hub's base model.
            assert model["args"] == [
                "--model_name=script", "--backend=vllm", "--max_model_len=4096",
            ]  # fmt: skip
            assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
            version = next(e["value"] for e in model["env"] if e["name"] == deploy.VERSION_ENV)
            assert model["storageUri"].startswith(
                version_uri(settings, "script", version).rstrip("/")
            )
            assert (local_path(model["storageUri"]) / "config.json").is_file()
    serverless = deploy.deploy_manifest(settings, "script", 10, Mode.SERVERLESS)
    assert serverless["spec"]["predictor"]["canaryTrafficPercent"] == 10


def test_the_script_artifact_key_is_the_one_training_logs():
    from training.llm.package import MODEL_ARTIFACT

    assert deploy.SCRIPT_WEIGHTS_ARTIFACT == MODEL_ARTIFACT


def test_a_models_uri_source_is_followed_to_its_artifacts(trend, monkeypatch):
    settings, (v1, _) = trend
    client = registry.connect(settings)
    expected = client.get_model_version_download_uri("trend", v1)
    source = client.get_model_version("trend", v1).source
    assert source.startswith("models:/m-")
    monkeypatch.setattr(type(client), "get_model_version_download_uri", lambda self, n, v: source)
    assert registry.artifact_uri(client, "trend", v1).rstrip("/") == expected.rstrip("/")


@pytest.mark.parametrize(
    ("model", "canary", "mode", "namespace", "problem"),
    [
        ("ghost", 0, "serverless", None, "no deployable model 'ghost'; known: niche, quality"),
        ("trend", -1, "serverless", None, "between 0 and 100, not -1"),
        ("trend", 101, "raw", None, "between 0 and 100, not 101"),
        ("trend", True, "raw", None, "whole number, not True"),
        ("trend", 2.5, "raw", None, "whole number, not 2.5"),
        ("trend", 10, "knative", None, "one of serverless, raw, not 'knative'"),
        ("trend", 10, "raw", "Team_A", "namespace 'Team_A' is not a DNS label"),
    ],
)
def test_bad_requests_are_refused(trend, model, canary, mode, namespace, problem):
    with pytest.raises(DeployError, match=problem):
        deploy.deploy_manifest(trend[0], model, canary, mode, namespace)


def test_a_model_without_champion_is_refused(tmp_path):
    settings = make_settings(tmp_path / "state")
    with pytest.raises(DeployError, match="'quality' has no champion to deploy"):
        deploy.deploy_manifest(settings, "quality")  # not even registered
    (version,) = register_versions(settings, "quality", 1)
    with pytest.raises(DeployError, match="'quality' has no champion to deploy"):
        deploy.deploy_manifest(settings, "quality", 10)
    client = registry.connect(settings)
    registry.promote(client, "quality", version)
    assert deploy.deploy_manifest(settings, "quality")["metadata"]["name"] == "quality"
    with pytest.raises(DeployError, match="'quality' has no challenger"):
        deploy.deploy_manifest(settings, "quality", 10)
    with pytest.raises(DeployError, match="'quality' has no challenger"):
        deploy.promote(settings, "quality")
    registry.promote(client, "quality", version, Alias.CHALLENGER)
    with pytest.raises(DeployError, match=rf"challenger of 'quality' \(v{version}\) already is"):
        deploy.deploy_manifest(settings, "quality", 10)
    with pytest.raises(RegistryError, match="no previous champion"):
        deploy.rollback(settings, "quality")


def test_niche_deploys_the_global_models_versions(tmp_path):
    settings = make_settings(tmp_path / "state")
    versions = register_versions(settings, "niche-global", 2)
    with_aliases(settings, "niche-global", versions)
    manifest = deploy.deploy_manifest(settings, "niche", 30, Mode.RAW)
    assert manifest["metadata"]["name"] == "niche"
    # The `contentml` runtime serves the model named like the InferenceService.
    assert manifest["spec"]["predictor"]["model"]["runtime"] == "contentml"
    assert served(manifest["spec"]["canary"][0]["predictor"]) == (
        versions[1],
        f"niche-global={versions[1]}",
    )


@pytest.mark.slow
def test_the_cli_renders_a_canary_then_promotes(fresh_trend, validator, tmp_path):
    settings, (v1, v2) = fresh_trend
    manifest = tmp_path / "isvc.yaml"
    canary = run_cli(settings.home, "deploy", "trend", "--canary", "10", "--output", str(manifest))
    assert canary.returncode == 0, canary.stderr
    rendered = yaml.safe_load(manifest.read_text())
    assert errors(validator, rendered) == []
    assert rendered["spec"]["predictor"]["canaryTrafficPercent"] == 10
    promoted = run_cli(settings.home, "deploy", "trend", "--promote", "--mode", "raw")
    assert promoted.returncode == 0, promoted.stderr
    assert served(yaml.safe_load(promoted.stdout)["spec"]["predictor"])[0] == v2
    assert json.loads(promoted.stderr.strip().splitlines()[-1])["to_version"] == v2
    bad = run_cli(settings.home, "deploy", "trend", "--canary", "150")
    assert bad.returncode == 2 and "must be within 0..100, not 150" in bad.stderr
