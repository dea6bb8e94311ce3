"""Render the kustomize overlays in `manifests/` and check every object offline, as the API
server would: built-in kinds against Kubernetes' own OpenAPI schemas (`kubernetes-validate`),
KServe and Kubeflow Trainer resources against their CRDs (`../shared/schemas`), unknown
fields refused everywhere (the API server would prune them silently). Then the platform's own
rules: no secret value in plain text, no container that may run as root.
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from contentml import cluster
from contentml.errors import UserError
from contentml.settings import PACKAGE_ROOT

MANIFESTS_DIR = PACKAGE_ROOT / "manifests"
OVERLAYS = ("dev", "prod")

KUBERNETES_VERSION = "1.32"
"""The cluster version the built-in kinds are checked against (as the installed kubectl)."""

_SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY", "API_KEY", "CREDENTIAL")


class ManifestError(UserError):
    """The manifests cannot be rendered (no kubectl, a kustomize error, no schema folder)."""


@dataclass(frozen=True)
class Report:
    """What `check` found in one overlay."""

    overlay: str
    kinds: dict[str, int]
    problems: list[str]


def render(overlay: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders from the kustomization folder `overlay`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ManifestError(
            "kubectl not found on PATH: rendering the overlays needs kubectl >= 1.27 (kustomize 5)"
            "; install it from https://kubernetes.io/docs/tasks/tools/"
        )
    done = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ManifestError(f"kubectl kustomize {overlay} failed: {done.stderr.strip()}")
    return [document for document in yaml.safe_load_all(done.stdout) if document]


def overlay_dir(overlay: str, manifests_dir: Path = MANIFESTS_DIR) -> Path:
    """The kustomization folder of `overlay` (`dev`, `prod`)."""
    folder = manifests_dir / "overlays" / overlay
    if not overlay or "/" in overlay or not folder.is_dir():
        known = sorted(p.name for p in (manifests_dir / "overlays").iterdir() if p.is_dir())
        raise ManifestError(f"no overlay {overlay!r} in {manifests_dir}; known: {known}")
    return folder


def crd_validator(crd: Path, version: str) -> jsonschema.Validator:
    """A validator for one served version of a CRD that refuses unknown fields: the API
    server prunes them silently, so a misspelt field would otherwise pass here and vanish in
    the cluster."""
    spec = yaml.load(crd.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (served,) = [v for v in spec["spec"]["versions"] if v["name"] == version]
    schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])

    def close(node: dict) -> None:
        if node.get("properties") and "additionalProperties" not in node:
            if not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
        for child in (node.get("properties") or {}).values():
            close(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                close(node[key])
        for option in node.get("anyOf", []) + node.get("allOf", []) + node.get("oneOf", []):
            close(option)

    close(schema)
    return jsonschema.Draft7Validator(schema)


@functools.cache
def crd_validators(schemas_dir: Path) -> dict[tuple[str, str], jsonschema.Validator]:
    """(apiVersion, kind) -> validator, for every served version of every CRD file under
    `schemas_dir` (`../shared/schemas`: KServe's and Kubeflow Trainer's)."""
    validators = {}
    for path in sorted(schemas_dir.rglob("*.yaml")):
        spec = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if not isinstance(spec, dict) or spec.get("kind") != "CustomResourceDefinition":
            continue
        for version in spec["spec"]["versions"]:
            key = (f"{spec['spec']['group']}/{version['name']}", spec["spec"]["names"]["kind"])
            validators[key] = crd_validator(path, version["name"])
    return validators


def _name(document: dict[str, Any]) -> str:
    metadata = document.get("metadata") or {}
    where = f"{metadata['namespace']}/" if metadata.get("namespace") else ""
    return f"{document.get('kind')} {where}{metadata.get('name')}"


def schema_problems(document: dict[str, Any], schemas_dir: Path) -> list[str]:
    """Where `document` breaks its kind's schema (an empty list when it does not)."""
    import kubernetes_validate

    key = (document.get("apiVersion", ""), document.get("kind", ""))
    validator = crd_validators(schemas_dir).get(key)
    if validator is not None:
        return [
            f"{_name(document)}: {'.'.join(map(str, error.absolute_path)) or '(top)'}: "
            f"{error.message}"
            for error in validator.iter_errors(document)
        ]
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{_name(document)}: no schema for {key[0]} {key[1]}: neither built in nor a CRD"]
    except kubernetes_validate.ValidationError as e:
        where = ".".join(map(str, e.path)) or "(top)"
        return [f"{_name(document)}: {where}: {e.message}"]
    return []


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, node) of `node` and everything below it."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}[{index}]")


def secret_problems(document: dict[str, Any]) -> list[str]:
    """Secret values written into the manifests: a Secret with data, or an environment
    variable that names a credential and carries a literal value instead of a reference."""
    if document.get("kind") == "Secret" and (document.get("data") or document.get("stringData")):
        return [f"{_name(document)}: carries secret values; reference a Secret made outside git"]
    problems = []
    for path, node in walk(document):
        if not (isinstance(node, dict) and "name" in node and "value" in node):
            continue
        name = str(node["name"])
        if name in cluster.SECRET_VARIABLES or any(word in name.upper() for word in _SECRET_WORDS):
            problems.append(f"{_name(document)}: {path}: {name} has a plain-text value")
    return problems


def _pod_specs(document: dict[str, Any]) -> Iterator[tuple[dict, list[tuple[str, dict]]]]:
    """(pod-level spec, its containers by path) of every pod `document` makes; a KServe
    predictor's `model` is its model server's container."""
    for path, node in walk(document):
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("containers"), list):
            yield node, [(f"{path}.containers[{i}]", c) for i, c in enumerate(node["containers"])]
        elif path.endswith("predictor") and isinstance(node.get("model"), dict):
            yield node, [(f"{path}.model", node["model"])]


def _runs_as_root(pod: dict, container: dict) -> bool:
    pod_context = pod.get("securityContext") or {}
    context = {**pod_context, **(container.get("securityContext") or {})}
    if context.get("runAsUser") == 0:
        return True
    return not (context.get("runAsNonRoot") is True and context.get("runAsUser"))


def root_problems(document: dict[str, Any]) -> list[str]:
    """Containers that may run as root: each must say runAsNonRoot with a non-zero user, in
    its own securityContext or its pod's. A ServingRuntime's containers say it themselves."""
    problems = []
    for pod, containers in _pod_specs(document):
        for path, container in containers:
            if _runs_as_root(pod, container):
                problems.append(
                    f"{_name(document)}: {path} may run as root: set runAsNonRoot and "
                    f"runAsUser {cluster.RUN_AS_USER}"
                )
    return problems


def check(overlay: str, schemas_dir: Path, manifests_dir: Path = MANIFESTS_DIR) -> Report:
    """Render `manifests_dir/overlays/<overlay>` and check every object it holds."""
    if not (schemas_dir / "kserve").is_dir() or not (schemas_dir / "kubeflow-trainer").is_dir():
        raise ManifestError(
            f"{schemas_dir}: no kserve/ and kubeflow-trainer/ CRD folders (../shared/schemas)"
        )
    documents = render(overlay_dir(overlay, manifests_dir))
    problems = []
    for document in documents:
        problems += schema_problems(document, schemas_dir)
        problems += secret_problems(document)
        problems += root_problems(document)
    kinds = Counter(str(d.get("kind")) for d in documents)
    return Report(overlay, dict(sorted(kinds.items())), problems)
