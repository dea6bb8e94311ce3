"""The KServe InferenceService of a model, rendered from the registry's aliases: the champion
serves, the challenger takes a canary share of the traffic.

Everything but the versions comes from the InferenceService in `manifests/` (the base, or an
overlay's rendering with `overlay=`): runtime, resources, autoscaling, security. The manifest
is then a function of the aliases and the canary percent: promoting or rolling back is moving
the `champion` alias and rendering again with no canary.

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

Our predictors (the `contentml` ServingRuntime) load their version from the registry
themselves: each is pinned to it (`CONTENTML_PINNED_VERSIONS`). KServe's Hugging Face runtime
cannot read `models:/` URIs: the script predictor gets the version's merged weights
(`storageUri`, in the cluster `s3://...`), which KServe's storage initializer downloads.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from contentml import names, registry
from contentml.errors import UserError
from contentml.registry import Alias, AliasEvent
from contentml.settings import Settings
from entrypoints import manifests
from entrypoints.manifests import MANIFESTS_DIR

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"

SERVING_MANIFESTS = MANIFESTS_DIR / "base" / "serving" / "inferenceservices.yaml"
"""The InferenceServices as applied before any deployment: the templates of `render`."""

VERSION_ENV = "CONTENTML_MODEL_VERSION"
"""The registered version a predictor serves."""

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

AUTOSCALING_FIELDS = ("minReplicas", "maxReplicas", "scaleMetric", "scaleMetricType", "scaleTarget")
"""Fields KServe refuses on a RawDeployment canary; it scales the canary by its defaults."""

CARRIED_COMPONENTS = ("transformer", "explainer")
"""Components of the template that serve no model version, rendered as the template has them:
the script model's transformer is its token check, and a manifest without it would remove it
from the cluster on `kubectl apply`."""

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


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
    """What runs a predictor: the template's `model.modelFormat.name`."""

    CONTAINER = "contentml"  # our image running `contentml serve` (the `contentml` runtime)
    HUGGINGFACE = "huggingface"  # KServe's Hugging Face runtime (vLLM) on the merged weights


@dataclass(frozen=True)
class Target:
    registered_model: str
    """Registered model whose aliases pick the versions."""

    runtime: Runtime
    """What runs the predictor."""


TARGETS: dict[str, Target] = {
    "trend": Target("trend", Runtime.CONTAINER),
    "quality": Target("quality", Runtime.CONTAINER),
    # The router serves every `niche-<slug>` champion; the versions deployed are the global
    # model's, the per-niche models load their champions.
    "niche": Target("niche-global", Runtime.CONTAINER),
    "script": Target("script", Runtime.HUGGINGFACE),
}
"""Served model (`serving.server.PREDICTORS`, the InferenceService's name) -> its versions."""


@dataclass(frozen=True)
class Release:
    """One registered version, and where KServe fetches it (None: the predictor loads it
    from the registry itself)."""

    version: str
    storage_uri: str | None = None


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
    # The MLmodel file is data: a path out of the version's folder must not reach KServe.
    return f"{uri.rstrip('/')}/{names.artifact_path(path)}"


def _release(client: registry.RegistryClient, target: Target, version: str) -> Release:
    if target.runtime is not Runtime.HUGGINGFACE:
        return Release(version)
    # KServe's storage initializer downloads whatever it is given: only the registry's store.
    uri = registry.stored_artifact_uri(client, target.registered_model, version)
    return Release(version, _script_weights_uri(uri, target.registered_model, version))


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


def template(model: str, overlay: str | None = None) -> dict[str, Any]:
    """The InferenceService named `model` in the base manifests, or in `overlay`'s rendering
    (`manifests/overlays/<overlay>`, through `kubectl kustomize`)."""
    if overlay is None:
        documents = list(yaml.safe_load_all(SERVING_MANIFESTS.read_text(encoding="utf-8")))
    else:
        documents = manifests.render(manifests.overlay_dir(overlay))
    for document in documents:
        if document.get("kind") == KIND and document["metadata"]["name"] == model:
            found = document
            break
    else:
        where = SERVING_MANIFESTS if overlay is None else f"overlay {overlay!r}"
        raise DeployError(f"no InferenceService {model!r} in {where}")
    runtime = found["spec"]["predictor"].get("model", {}).get("modelFormat", {}).get("name")
    if runtime != TARGETS[model].runtime:
        raise DeployError(
            f"the InferenceService {model!r} in {overlay or SERVING_MANIFESTS} runs model format "
            f"{runtime!r}, not {TARGETS[model].runtime.value!r}"
        )
    return found


def _released(predictor: dict[str, Any], target: Target, release: Release) -> dict[str, Any]:
    """The template's predictor serving `release`."""
    predictor = copy.deepcopy(predictor)
    model = predictor["model"]
    env = [e for e in model.get("env", []) if e["name"] not in (VERSION_ENV, PINNED_ENV)]
    env.append({"name": VERSION_ENV, "value": release.version})
    if target.runtime is Runtime.CONTAINER:
        # Each predictor serves its own version; KServe, not the server, moves the traffic.
        env.append({"name": PINNED_ENV, "value": f"{target.registered_model}={release.version}"})
    else:
        model["storageUri"] = release.storage_uri
        # The weights come from storageUri (a registered version's, immutable); a hub model id
        # would take precedence, and its revision names a commit of the hub's model.
        hub = ("--model_id", "--model_revision")
        model["args"] = [a for a in model.get("args", []) if not a.startswith(hub)]
    model["env"] = env
    return {**predictor, "labels": {**predictor.get("labels", {}), LABEL_VERSION: release.version}}


def _for_mode(component: dict[str, Any], mode: Mode) -> dict[str, Any]:
    """A RawDeployment scales with an HPA on CPU: Knative's concurrency target does not apply."""
    if mode is Mode.RAW and component.get("scaleMetric") == "concurrency":
        return {k: v for k, v in component.items() if k not in ("scaleMetric", "scaleTarget")}
    return component


def render(
    template: dict[str, Any],
    champion: Release,
    challenger: Release | None,
    canary_percent: int,
    mode: Mode,
    namespace: str | None,
) -> dict[str, Any]:
    """`template` (an InferenceService of `manifests/`) serving these releases;
    `deploy_manifest` reads them from the registry."""
    model = template["metadata"]["name"]
    target = TARGETS[model]
    labels = {
        **template["metadata"].get("labels", {}),
        "app.kubernetes.io/part-of": "contentml",
        LABEL_MODEL: model,
        LABEL_CHAMPION: champion.version,
    }
    if challenger is not None:
        labels[LABEL_CHALLENGER] = challenger.version
    metadata: dict[str, Any] = {
        "name": model,
        "labels": labels,
        "annotations": {
            **template["metadata"].get("annotations", {}),
            DEPLOYMENT_MODE_ANNOTATION: DEPLOYMENT_MODE[mode],
        },
    }
    namespace = namespace or template["metadata"].get("namespace")
    if namespace is not None:
        metadata["namespace"] = namespace
    stable = _for_mode(template["spec"]["predictor"], mode)
    if mode is Mode.SERVERLESS:
        predictor = _released(stable, target, challenger or champion)
        if challenger is not None:
            predictor["canaryTrafficPercent"] = canary_percent
        spec: dict[str, Any] = {"predictor": predictor}
    else:
        predictor = _released(stable, target, champion)
        spec = {"predictor": {"name": f"v{champion.version}", **predictor}}
        if challenger is not None:
            canary = _released(stable, target, challenger)
            canary = {k: v for k, v in canary.items() if k not in AUTOSCALING_FIELDS}
            spec["canary"] = [
                {
                    "trafficPercent": canary_percent,
                    "predictor": {"name": f"v{challenger.version}", **canary},
                }
            ]
    for component in CARRIED_COMPONENTS:
        if component in template["spec"]:
            spec[component] = _for_mode(template["spec"][component], mode)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def deploy_manifest(
    settings: Settings,
    model: str,
    canary_percent: int = 0,
    mode: Mode | str = Mode.SERVERLESS,
    namespace: str | None = None,
    overlay: str | None = None,
) -> dict[str, Any]:
    """The InferenceService serving `model`'s champion, with its challenger on a canary of
    `canary_percent` % of the traffic (0: no canary), shaped as `overlay`'s (default: the
    base manifests). Without `namespace`, the overlay's, else `kubectl apply -n` decides."""
    _, mode = _check_request(model, canary_percent, mode, namespace)
    return _from_aliases(settings, template(model, overlay), canary_percent, mode, namespace)


def _from_aliases(
    settings: Settings,
    shape: dict[str, Any],
    canary_percent: int,
    mode: Mode,
    namespace: str | None,
) -> dict[str, Any]:
    """`shape` serving the versions the aliases name now."""
    champion, challenger = releases(settings, shape["metadata"]["name"], canary_percent > 0)
    return render(shape, champion, challenger, canary_percent, mode, namespace)


def promote(
    settings: Settings,
    model: str,
    mode: Mode | str = Mode.SERVERLESS,
    namespace: str | None = None,
    reason: str = "canary promoted",
    overlay: str | None = None,
) -> tuple[AliasEvent, dict[str, Any]]:
    """Make the challenger the champion; the manifest that follows serves it alone."""
    target, mode = _check_request(model, 0, mode, namespace)
    shape = template(model, overlay)  # a bad overlay fails before the alias moves
    _, challenger = releases(settings, model, canary=True)
    client = registry.connect(settings)
    event = registry.promote(client, target.registered_model, challenger.version, reason=reason)
    return event, _from_aliases(settings, shape, 0, mode, namespace)


def rollback(
    settings: Settings,
    model: str,
    mode: Mode | str = Mode.SERVERLESS,
    namespace: str | None = None,
    reason: str = "manual rollback",
    overlay: str | None = None,
) -> tuple[AliasEvent, dict[str, Any]]:
    """Point the champion back at the previous one; the manifest that follows serves it."""
    target, mode = _check_request(model, 0, mode, namespace)
    shape = template(model, overlay)  # a bad overlay fails before the alias moves
    client = registry.connect(settings)
    event = registry.rollback(client, target.registered_model, reason=reason)
    return event, _from_aliases(settings, shape, 0, mode, namespace)
