"""The KServe InferenceService of a model, rendered from the registry's aliases: the champion
serves, the challenger takes a canary share of the traffic.

The manifest is a function of the aliases and the canary percent, nothing else: promoting or
rolling back is moving the `champion` alias and rendering again with no canary.

Where the canary goes, per deployment mode (the CRD in `../shared/schemas/kserve`):

- Serverless (Knative): `spec.predictor.canaryTrafficPercent`. The predictor carries the
  challenger; KServe gives it that share of the traffic and the rest to the last revision that
  was rolled out at 100 %, which is the champion's when the champion's manifest (canary 0) was
  the last one applied. A first apply of a canary manifest has no earlier revision, so the
  challenger gets all the traffic: apply the champion first. `canaryTrafficPercent: 0` would pin
  all traffic to that earlier revision, so no canary means the field is left out.
- RawDeployment (`Standard`, KServe >= 0.20): `spec.canary`, a list of `{trafficPercent,
  predictor}` with a named predictor each; the champion stays in `spec.predictor`. Predictors
  are named after their version (`v3`), so that promoting (the stable predictor taking the
  canary's name and model) retargets KServe's stable route to the canary's Deployment without
  a restart, and dropping the canary entry removes its Deployment.

KServe cannot read `models:/` URIs: each predictor gets the version's artifact location (in the
cluster `s3://...`), which KServe's storage initializer downloads to `/mnt/models`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from contentml import registry
from contentml.errors import UserError
from contentml.registry import Alias, AliasEvent
from contentml.settings import Settings

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
CONTAINER_NAME = "kserve-container"
"""KServe's name for the model server container; the storage initializer is injected for it."""

MODEL_MOUNT = "/mnt/models"
"""Where KServe's storage initializer puts the artifacts of `STORAGE_URI`."""

HTTP_PORT = 8080
READY_PATH = "/v2/health/ready"

VERSION_ENV = "CONTENTML_MODEL_VERSION"
"""The registered version a predictor serves, beside `STORAGE_URI` (its artifacts)."""

PINNED_ENV = "CONTENTML_PINNED_VERSIONS"
"""`Settings.pinned_versions`: our model server then serves that version, not the alias."""

SCRIPT_WEIGHTS_ARTIFACT = "model"
"""Artifact key of the merged causal LM inside the script pyfunc
(`training.llm.package.MODEL_ARTIFACT`; not imported here, that module loads torch)."""

LABEL_MODEL = "contentml/model"
LABEL_CHAMPION = "contentml/champion-version"
LABEL_CHALLENGER = "contentml/challenger-version"
LABEL_VERSION = "contentml/version"
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LOGGED_MODEL_URI = re.compile(r"models:/(m-[0-9a-f]+)")
"""A version's source when it was registered from an MLflow 3 logged model."""


class DeployError(UserError):
    """A deployment that cannot be rendered as asked."""


class Mode(StrEnum):
    """KServe deployment mode, as `contentml deploy --mode` names it."""

    SERVERLESS = "serverless"
    RAW = "raw"


DEPLOYMENT_MODE = {Mode.SERVERLESS: "Knative", Mode.RAW: "Standard"}
"""The annotation's values since KServe 0.17 renamed `Serverless` and `RawDeployment` (still
accepted, but compared as written against the mode recorded in the status on updates)."""


class Runtime(StrEnum):
    CONTAINER = "container"  # our image running `contentml serve`
    HUGGINGFACE = "huggingface"  # KServe's Hugging Face runtime (vLLM) on the merged weights


@dataclass(frozen=True)
class Target:
    registered_model: str
    """Registered model whose aliases pick the versions."""

    runtime: Runtime
    """What runs the predictor."""

    requests: dict[str, str]
    """Resource requests; limits are the same (Guaranteed QoS)."""

    replicas: tuple[int, int] = (1, 3)
    """(min, max) replicas of the stable predictor; canaries keep KServe's defaults."""

    extra_args: tuple[str, ...] = field(default=())
    """Arguments after the runtime's own."""


TARGETS: dict[str, Target] = {
    "trend": Target("trend", Runtime.CONTAINER, {"cpu": "1", "memory": "2Gi"}),
    "quality": Target("quality", Runtime.CONTAINER, {"cpu": "2", "memory": "4Gi"}),
    # The router serves every `niche-<slug>` champion; the versions deployed are the global
    # model's, the per-niche models load their champions.
    "niche": Target("niche-global", Runtime.CONTAINER, {"cpu": "1", "memory": "2Gi"}),
    "script": Target(
        "script",
        Runtime.HUGGINGFACE,
        {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
        replicas=(1, 1),
        extra_args=("--backend=vllm",),
    ),
}
"""Served model (`serving.server.PREDICTORS`) -> how the cluster serves it."""


@dataclass(frozen=True)
class Release:
    """One registered version, where KServe can fetch it."""

    version: str
    storage_uri: str


def artifact_uri(client: MlflowClient, name: str, version: str) -> str:
    """The artifact location of a version (`s3://...` in the cluster, a local path or `file://`
    here), never a `models:/` URI."""
    uri = client.get_model_version_download_uri(name, version)
    if uri.startswith("models:/"):
        # A backend that stored the logged model's URI as is: follow it to its artifacts.
        found = registry.model_version(client, name, version)
        logged = _LOGGED_MODEL_URI.fullmatch(found.source or "")
        model_id = found.model_id or (logged.group(1) if logged else None)
        if model_id:
            uri = client.get_logged_model(model_id).artifact_location
    if uri.startswith("models:/"):
        raise DeployError(f"model {name!r} version {version} has no artifact location ({uri})")
    return uri


def _script_weights_uri(uri: str, name: str, version: str) -> str:
    """The merged model folder inside the script pyfunc, as its MLmodel records it."""
    try:
        artifacts = Model.load(uri).flavors["python_function"]["artifacts"]
        path = artifacts[SCRIPT_WEIGHTS_ARTIFACT]["path"]
    except (KeyError, OSError, MlflowException) as e:
        raise DeployError(
            f"model {name!r} version {version} has no {SCRIPT_WEIGHTS_ARTIFACT!r} artifact "
            f"with the merged weights the Hugging Face runtime serves"
        ) from e
    return f"{uri.rstrip('/')}/{path}"


def _release(client: MlflowClient, target: Target, version: str) -> Release:
    uri = artifact_uri(client, target.registered_model, version)
    if target.runtime is Runtime.HUGGINGFACE:
        uri = _script_weights_uri(uri, target.registered_model, version)
    return Release(version, uri)


def _check_request(model: str, canary_percent: int, mode: Mode | str, namespace: str | None):
    if model not in TARGETS:
        raise DeployError(f"no deployable model {model!r}; known: {', '.join(sorted(TARGETS))}")
    if isinstance(canary_percent, bool) or not isinstance(canary_percent, int):
        raise DeployError(f"canary percent must be a whole number, not {canary_percent!r}")
    if not 0 <= canary_percent <= 100:
        raise DeployError(f"canary percent must be between 0 and 100, not {canary_percent}")
    try:
        mode = Mode(mode)
    except ValueError as e:
        known = ", ".join(m.value for m in Mode)
        raise DeployError(f"deployment mode must be one of {known}, not {mode!r}") from e
    if namespace is not None and not (len(namespace) <= 63 and _DNS_LABEL.fullmatch(namespace)):
        raise DeployError(f"namespace {namespace!r} is not a DNS label")
    return TARGETS[model], mode


def releases(settings: Settings, model: str, canary: bool) -> tuple[Release, Release | None]:
    """The champion, and the challenger when `canary`: what the manifest serves."""
    target = TARGETS[model]
    name = target.registered_model
    client = registry.connect(settings)
    champion = registry.alias_version(client, name, Alias.CHAMPION)
    if champion is None:
        raise DeployError(
            f"model {name!r} has no champion to deploy: promote a version first "
            f"(`contentml promote {name} VERSION`)"
        )
    if not canary:
        return _release(client, target, champion), None
    challenger = registry.alias_version(client, name, Alias.CHALLENGER)
    if challenger is None:
        raise DeployError(f"model {name!r} has no challenger to put on a canary")
    if challenger == champion:
        raise DeployError(
            f"the challenger of {name!r} (v{challenger}) already is the champion: "
            f"nothing to put on a canary"
        )
    return (
        _release(client, target, champion),
        _release(client, target, challenger),
    )


def _resources(target: Target) -> dict[str, dict[str, str]]:
    return {"requests": dict(target.requests), "limits": dict(target.requests)}


def _container_predictor(
    settings: Settings, model: str, target: Target, release: Release
) -> dict[str, Any]:
    env = {
        **settings.to_env(),
        "STORAGE_URI": release.storage_uri,
        VERSION_ENV: release.version,
        # Each predictor serves its own version; KServe, not the server, moves the traffic.
        PINNED_ENV: f"{target.registered_model}={release.version}",
    }
    container = {
        "name": CONTAINER_NAME,
        "image": settings.platform_image,
        "command": ["contentml"],  # whatever the image's entrypoint
        "args": ["serve", "--models", model, "--port", str(HTTP_PORT)],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [{"containerPort": HTTP_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": READY_PATH, "port": HTTP_PORT},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": _resources(target),
    }
    return {"containers": [container]}


def _huggingface_predictor(
    settings: Settings, model: str, target: Target, release: Release
) -> dict[str, Any]:
    return {
        "model": {
            # The container name is KServe's default; the canary's schema requires it.
            "name": CONTAINER_NAME,
            "modelFormat": {"name": "huggingface"},
            "storageUri": release.storage_uri,
            "args": [f"--model_name={model}", *target.extra_args],
            "env": [{"name": VERSION_ENV, "value": release.version}],
            "resources": _resources(target),
        }
    }


PREDICTOR_BUILDERS = {
    Runtime.CONTAINER: _container_predictor,
    Runtime.HUGGINGFACE: _huggingface_predictor,
}


def _predictor(settings: Settings, model: str, target: Target, release: Release) -> dict:
    spec = PREDICTOR_BUILDERS[target.runtime](settings, model, target, release)
    return {"labels": {LABEL_VERSION: release.version}, **spec}


def _autoscaled(predictor: dict, target: Target) -> dict:
    low, high = target.replicas
    return {**predictor, "minReplicas": low, "maxReplicas": high}


def render(
    settings: Settings,
    model: str,
    champion: Release,
    challenger: Release | None,
    canary_percent: int,
    mode: Mode,
    namespace: str | None,
) -> dict[str, Any]:
    """The InferenceService for these releases; `deploy_manifest` reads them from the
    registry."""
    target = TARGETS[model]
    labels = {
        "app.kubernetes.io/part-of": "contentml",
        LABEL_MODEL: model,
        LABEL_CHAMPION: champion.version,
    }
    if challenger is not None:
        labels[LABEL_CHALLENGER] = challenger.version
    metadata: dict[str, Any] = {
        "name": model,
        "labels": labels,
        "annotations": {DEPLOYMENT_MODE_ANNOTATION: DEPLOYMENT_MODE[mode]},
    }
    if namespace is not None:
        metadata["namespace"] = namespace
    if mode is Mode.SERVERLESS:
        serving = challenger if challenger is not None else champion
        predictor = _autoscaled(_predictor(settings, model, target, serving), target)
        if challenger is not None:
            predictor["canaryTrafficPercent"] = canary_percent
        spec: dict[str, Any] = {"predictor": predictor}
    else:
        predictor = _predictor(settings, model, target, champion)
        spec = {"predictor": {"name": f"v{champion.version}", **_autoscaled(predictor, target)}}
        if challenger is not None:
            canary = _predictor(settings, model, target, challenger)
            spec["canary"] = [
                {
                    "trafficPercent": canary_percent,
                    "predictor": {"name": f"v{challenger.version}", **canary},
                }
            ]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def deploy_manifest(
    settings: Settings,
    model: str,
    canary_percent: int = 0,
    mode: Mode | str = Mode.SERVERLESS,
    namespace: str | None = None,
) -> dict[str, Any]:
    """The InferenceService serving `model`'s champion, with its challenger on a canary of
    `canary_percent` % of the traffic (0: no canary). Without `namespace`, `kubectl apply -n`
    decides."""
    _, mode = _check_request(model, canary_percent, mode, namespace)
    champion, challenger = releases(settings, model, canary=canary_percent > 0)
    return render(settings, model, champion, challenger, canary_percent, mode, namespace)


def promote(
    settings: Settings,
    model: str,
    mode: Mode | str = Mode.SERVERLESS,
    namespace: str | None = None,
    reason: str = "canary promoted",
) -> tuple[AliasEvent, dict[str, Any]]:
    """Make the challenger the champion; the manifest that follows serves it alone."""
    target, _ = _check_request(model, 0, mode, namespace)
    _, challenger = releases(settings, model, canary=True)
    client = registry.connect(settings)
    event = registry.promote(client, target.registered_model, challenger.version, reason=reason)
    return event, deploy_manifest(settings, model, 0, mode, namespace)


def rollback(
    settings: Settings,
    model: str,
    mode: Mode | str = Mode.SERVERLESS,
    namespace: str | None = None,
    reason: str = "manual rollback",
) -> tuple[AliasEvent, dict[str, Any]]:
    """Point the champion back at the previous one; the manifest that follows serves it."""
    target, _ = _check_request(model, 0, mode, namespace)
    client = registry.connect(settings)
    event = registry.rollback(client, target.registered_model, reason=reason)
    return event, deploy_manifest(settings, model, 0, mode, namespace)


def to_yaml(manifest: dict[str, Any]) -> str:
    """The manifest as `kubectl apply -f` reads it."""
    return yaml.safe_dump(manifest, sort_keys=False)
