"""Render the kustomize overlays in `manifests/` and check every object offline, as the API
server would: built-in kinds against Kubernetes' own OpenAPI schemas (`kubernetes-validate`),
KServe and Kubeflow Trainer resources against their CRDs (`../shared/schemas`), unknown
fields refused everywhere (the API server would prune them silently). Then the platform's own
rules: no secret value in plain text, no container that may run as root, every pod template
(Deployments, Jobs, ServingRuntimes, InferenceService predictors, TrainingRuntimes) within the
Pod Security Standards' `restricted` profile, with resources and a read-only root filesystem,
every namespace closed by default with a NetworkPolicy for each workload, and nothing that moves
under a release: images pinned by digest or the platform's own at a version, hub models at a
commit.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
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
    variable that names a credential and carries a literal value instead of a reference. And
    credentials handed out loosely: a whole Secret in `envFrom` (a pod gets every key, write
    credentials included; name the keys), or a bearer token that is an optional key (a missing
    key would leave the routes open)."""
    if document.get("kind") == "Secret" and (document.get("data") or document.get("stringData")):
        return [f"{_name(document)}: carries secret values; reference a Secret made outside git"]
    problems = []
    for path, node in walk(document):
        if not isinstance(node, dict):
            continue
        if path.endswith("]") and "secretRef" in node and ".envFrom[" in path:
            problems.append(
                f"{_name(document)}: {path}: takes the whole Secret {node['secretRef'].get('name')}"
                "; name each key in `env` (contentml.cluster.secret_env)"
            )
        reference = node.get("secretKeyRef")
        if isinstance(reference, dict) and reference.get("key") in cluster.TOKEN_VARIABLES:
            if reference.get("optional") is True:
                problems.append(
                    f"{_name(document)}: {path}: {reference['key']} is an optional key: a pod "
                    "without it would serve every route unauthenticated"
                )
        if not ("name" in node and "value" in node):
            continue
        name = str(node["name"])
        if name in cluster.SECRET_VARIABLES or any(word in name.upper() for word in _SECRET_WORDS):
            problems.append(f"{_name(document)}: {path}: {name} has a plain-text value")
    return problems


_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


@dataclass(frozen=True)
class Pod:
    """One pod template found in a document: its pod-level fields and its containers."""

    path: str
    spec: dict[str, Any]
    containers: list[tuple[str, dict[str, Any]]]
    """(path, container) of its init, app and ephemeral containers."""

    @property
    def context(self) -> dict[str, Any]:
        return self.spec.get("securityContext") or {}


def pod_templates(document: dict[str, Any]) -> Iterator[Pod]:
    """Every pod `document` makes: a pod spec is whatever holds a `containers` list (a
    Deployment's or Job's template, a ServingRuntime's spec, a TrainingRuntime's replicated
    jobs); a KServe predictor's `model` is its model server's container."""
    for path, node in walk(document):
        if not isinstance(node, dict):
            continue
        is_predictor = path.endswith("predictor") and isinstance(node.get("model"), dict)
        if not (isinstance(node.get("containers"), list) or is_predictor):
            continue
        containers = [(f"{path}.model", node["model"])] if is_predictor else []
        for key in _CONTAINER_LISTS:
            containers += [(f"{path}.{key}[{i}]", c) for i, c in enumerate(node.get(key) or [])]
        yield Pod(path, node, containers)


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
    for pod in pod_templates(document):
        for path, container in pod.containers:
            if _runs_as_root(pod.spec, container):
                problems.append(
                    f"{_name(document)}: {path} may run as root: set runAsNonRoot and "
                    f"runAsUser {cluster.RUN_AS_USER}"
                )
    return problems


# The Pod Security Standards' `restricted` profile, baseline's controls included, as
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ lists them for
# Kubernetes 1.32. Written out here rather than run through a policy checker: the reference
# implementation (k8s.io/pod-security-admission) is Go inside the API server, kubescape,
# kube-score, polaris and kube-linter are Go binaries pip cannot install, and checkov, the one
# maintained checker on PyPI, conflicts with constraints.txt (it pins tabulate < 0.10) and reads
# only built-in workload kinds, not the pod templates inside ServingRuntimes, InferenceServices
# and TrainingRuntimes that make most of our pods. Each rule reads one pod template as it is
# written; KServe merges a ServingRuntime's container into each predictor's `model`, and each
# of the two must pass on its own.


class Rule(StrEnum):
    """A control of the restricted profile (its name in the standard), or one of the
    platform's own (the last two)."""

    HOST_PROCESS = "HostProcess"
    HOST_NAMESPACES = "Host Namespaces"
    PRIVILEGED = "Privileged Containers"
    CAPABILITIES = "Capabilities"
    HOST_PATH = "HostPath Volumes"
    HOST_PORTS = "Host Ports"
    APPARMOR = "AppArmor"
    SELINUX = "SELinux"
    PROC_MOUNT = "/proc Mount Type"
    SECCOMP = "Seccomp"
    SYSCTLS = "Sysctls"
    VOLUME_TYPES = "Volume Types"
    PRIVILEGE_ESCALATION = "Privilege Escalation"
    RUN_AS_NON_ROOT = "Running as Non-root"
    RUN_AS_NON_ROOT_USER = "Running as Non-root user"
    RESOURCES = "Resources"
    """Requests of CPU and memory and a memory limit: a pod without them is the first evicted
    and may take a node's memory."""
    READ_ONLY_ROOT = "Read-only Root Filesystem"
    """Processes write only to volumes (an emptyDir on /tmp), never into the image."""


ALLOWED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
     "projected", "secret"}
)  # fmt: skip
ALLOWED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
SAFE_SYSCTLS = frozenset(
    {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_local_reserved_ports",
     "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range",
     "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
     "net.ipv4.tcp_keepalive_probes"}
)  # fmt: skip
ALLOWED_SECCOMP = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_APPARMOR = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)

Finding = tuple[str, str]
"""(where: the pod's path, or a container's path and name; what is wrong)."""


def _where(path: str, container: dict[str, Any]) -> str:
    return f"{path} ({container.get('name', '?')!r})"


def _contexts(pod: Pod) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, securityContext) of the pod and of each container."""
    yield pod.path, pod.context
    for path, container in pod.containers:
        yield _where(path, container), container.get("securityContext") or {}


def _host_process(pod: Pod) -> Iterator[Finding]:
    for where, context in _contexts(pod):
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            yield where, "windowsOptions.hostProcess is true"


def _host_namespaces(pod: Pod) -> Iterator[Finding]:
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.spec.get(key):
            yield pod.path, f"{key} is true"


def _privileged(pod: Pod) -> Iterator[Finding]:
    for path, container in pod.containers:
        if (container.get("securityContext") or {}).get("privileged"):
            yield _where(path, container), "securityContext.privileged is true"


def _capabilities(pod: Pod) -> Iterator[Finding]:
    for path, container in pod.containers:
        capabilities = (container.get("securityContext") or {}).get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            yield _where(path, container), "capabilities.drop does not include ALL"
        added = sorted(set(capabilities.get("add") or []) - ALLOWED_CAPABILITIES)
        if added:
            yield _where(path, container), f"capabilities.add has {added}: only NET_BIND_SERVICE"


def _volume_types(volume: dict[str, Any]) -> set[str]:
    return set(volume) - {"name"}


def _host_path(pod: Pod) -> Iterator[Finding]:
    for volume in pod.spec.get("volumes") or []:
        if "hostPath" in volume:
            yield pod.path, f"volume {volume.get('name')!r} is a hostPath"


def _volumes(pod: Pod) -> Iterator[Finding]:
    for volume in pod.spec.get("volumes") or []:
        kinds = sorted(_volume_types(volume) - ALLOWED_VOLUME_TYPES - {"hostPath"})
        if kinds:
            yield pod.path, f"volume {volume.get('name')!r} is of type {', '.join(kinds)}"


def _host_ports(pod: Pod) -> Iterator[Finding]:
    for path, container in pod.containers:
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                yield _where(path, container), f"hostPort {port['hostPort']} is set"


def _apparmor(pod: Pod) -> Iterator[Finding]:
    for where, context in _contexts(pod):
        kind = (context.get("appArmorProfile") or {}).get("type")
        if kind is not None and kind not in ALLOWED_APPARMOR:
            yield where, f"appArmorProfile.type is {kind}"


def _selinux(pod: Pod) -> Iterator[Finding]:
    for where, context in _contexts(pod):
        options = context.get("seLinuxOptions") or {}
        if options.get("type", "") not in ALLOWED_SELINUX_TYPES:
            yield where, f"seLinuxOptions.type is {options['type']}"
        for key in ("user", "role"):
            if options.get(key):
                yield where, f"seLinuxOptions.{key} is set"


def _proc_mount(pod: Pod) -> Iterator[Finding]:
    for path, container in pod.containers:
        mount = (container.get("securityContext") or {}).get("procMount", "Default")
        if mount != "Default":
            yield _where(path, container), f"procMount is {mount}"


def _seccomp(pod: Pod) -> Iterator[Finding]:
    default = (pod.context.get("seccompProfile") or {}).get("type")
    if default is not None and default not in ALLOWED_SECCOMP:
        yield pod.path, f"seccompProfile.type is {default}"
    for path, container in pod.containers:
        own = ((container.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        kind = own or default
        if kind not in ALLOWED_SECCOMP:
            yield (
                _where(path, container),
                f"seccompProfile.type is {kind}: set RuntimeDefault in the container or the pod",
            )


def _sysctls(pod: Pod) -> Iterator[Finding]:
    for sysctl in pod.context.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield pod.path, f"sysctl {sysctl.get('name')} is not a safe one"


def _privilege_escalation(pod: Pod) -> Iterator[Finding]:
    for path, container in pod.containers:
        if (container.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
            yield _where(path, container), "allowPrivilegeEscalation is not false"


def _run_as_non_root(pod: Pod) -> Iterator[Finding]:
    default = pod.context.get("runAsNonRoot")
    if default is False:
        yield pod.path, "runAsNonRoot is false"
    for path, container in pod.containers:
        own = (container.get("securityContext") or {}).get("runAsNonRoot")
        if (default if own is None else own) is not True:
            yield _where(path, container), "runAsNonRoot is not true (container or pod)"


def _run_as_non_root_user(pod: Pod) -> Iterator[Finding]:
    for where, context in _contexts(pod):
        if context.get("runAsUser") == 0:
            yield where, "runAsUser is 0"


def resource_problems(resources: dict[str, Any] | None) -> list[str]:
    """What `resources` (a container's, or a TrainJob's `resourcesPerNode`) lacks."""
    resources = resources or {}
    wanted = [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")]
    return [f"resources.{a}.{b} is not set" for a, b in wanted if b not in (resources.get(a) or {})]


def _resources(pod: Pod) -> Iterator[Finding]:
    for path, container in pod.containers:
        for problem in resource_problems(container.get("resources")):
            yield _where(path, container), problem


def _read_only_root(pod: Pod) -> Iterator[Finding]:
    for path, container in pod.containers:
        if (container.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
            yield (
                _where(path, container),
                "readOnlyRootFilesystem is not true (mount an emptyDir where it writes)",
            )


RULES: dict[Rule, Callable[[Pod], Iterator[Finding]]] = {
    Rule.HOST_PROCESS: _host_process,
    Rule.HOST_NAMESPACES: _host_namespaces,
    Rule.PRIVILEGED: _privileged,
    Rule.CAPABILITIES: _capabilities,
    Rule.HOST_PATH: _host_path,
    Rule.HOST_PORTS: _host_ports,
    Rule.APPARMOR: _apparmor,
    Rule.SELINUX: _selinux,
    Rule.PROC_MOUNT: _proc_mount,
    Rule.SECCOMP: _seccomp,
    Rule.SYSCTLS: _sysctls,
    Rule.VOLUME_TYPES: _volumes,
    Rule.PRIVILEGE_ESCALATION: _privilege_escalation,
    Rule.RUN_AS_NON_ROOT: _run_as_non_root,
    Rule.RUN_AS_NON_ROOT_USER: _run_as_non_root_user,
    Rule.RESOURCES: _resources,
    Rule.READ_ONLY_ROOT: _read_only_root,
}


def restricted_problems(document: dict[str, Any]) -> list[str]:
    """Where a pod template of `document` leaves the restricted profile or runs without
    resources or with a writable root filesystem, one line per container and rule. A TrainJob's
    `resourcesPerNode` replaces its runtime's container resources, so it is held to the same."""
    problems = [
        f"{_name(document)}: {where}: {rule.value}: {what}"
        for pod in pod_templates(document)
        for rule, findings in RULES.items()
        for where, what in findings(pod)
    ]
    if document.get("kind") == "TrainJob":
        trainer = (document.get("spec") or {}).get("trainer") or {}
        if "resourcesPerNode" in trainer:
            problems += [
                f"{_name(document)}: spec.trainer.resourcesPerNode: {Rule.RESOURCES.value}: {p}"
                for p in resource_problems(trainer["resourcesPerNode"])
            ]
    return problems


OWN_IMAGE = re.compile(r"ghcr\.io/contentml/(platform|training):\d+\.\d+\.\d+")
"""The project's own images at a release's version tag (`make images`; the overlays' `images:`
set the registry and tag, a release may add `digest:`)."""
DIGEST = re.compile(r"[^@\s]+@sha256:[0-9a-f]{64}")
"""An image pinned by its content: what every other image must be."""
REVISION = re.compile(r"[0-9a-f]{40}")
"""A Hugging Face hub commit: a branch (`main`) moves, a commit does not."""


def pin_problems(document: dict[str, Any], require_digests: bool = False) -> list[str]:
    """What could change under a running release: an image neither pinned by digest nor the
    project's own at a version tag (with `require_digests`, a release whose pushed digests are
    known: any image not pinned by digest, ours included), and a hub model served without
    `--model_revision` at a commit."""
    problems = []
    for path, node in walk(document):
        if (path == "image" or path.endswith(".image")) and isinstance(node, str):
            if DIGEST.fullmatch(node):
                continue
            if require_digests:
                problems.append(
                    f"{_name(document)}: {path}: image {node} is not pinned by digest: add the "
                    "pushed digest to the overlay's `images:` entry (`digest: sha256:...`)"
                )
            elif not OWN_IMAGE.fullmatch(node):
                problems.append(
                    f"{_name(document)}: {path}: image {node} is neither pinned by digest "
                    "(@sha256:...) nor the platform's own at a version tag"
                )
        if path.endswith(".args") and isinstance(node, list):
            options = dict(str(a).partition("=")[::2] for a in node if str(a).startswith("--"))
            if "--model_id" in options and not REVISION.fullmatch(
                options.get("--model_revision", "")
            ):
                problems.append(
                    f"{_name(document)}: {path}: --model_id {options['--model_id']} without "
                    "--model_revision=<40-hex commit>: a branch moves under the release"
                )
    return problems


KSERVE_POD_LABEL = "serving.kserve.io/inferenceservice"
"""The label KServe puts on every pod of an InferenceService, with its name (besides the
InferenceService's own labels and its component's)."""
KSERVE_COMPONENT_LABEL = "component"
"""The label KServe puts on every pod of an InferenceService with the component it runs."""
KSERVE_COMPONENTS = ("predictor", "transformer", "explainer")
"""An InferenceService's components, each its own pods (KServe's `v1beta1.ComponentType`)."""


def labelled_pods(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, str]]]:
    """(path, labels) of each pod template of `document`, with the labels its pods carry: a
    template's own, or for an InferenceService's components KServe's (the InferenceService's
    labels, the component's own, its name and the component). A ServingRuntime makes no pod of
    its own (its container runs in its InferenceServices' predictors)."""
    kind = document.get("kind")
    metadata = document.get("metadata") or {}
    if kind == "ServingRuntime":
        return
    if kind == "InferenceService":
        for component in KSERVE_COMPONENTS:
            spec = document["spec"].get(component)
            if spec is None:
                continue
            yield (
                f"spec.{component}",
                {
                    **(metadata.get("labels") or {}),
                    **(spec.get("labels") or {}),
                    KSERVE_POD_LABEL: metadata["name"],
                    KSERVE_COMPONENT_LABEL: component,
                },
            )
        return
    for path, node in walk(document):
        if isinstance(node, dict) and isinstance((node.get("spec") or {}).get("containers"), list):
            yield (
                f"{path}.spec" if path else "spec",
                (node.get("metadata") or {}).get("labels") or {},
            )


_SELECTOR_OPERATORS: dict[str, Callable[[str, list[str] | None, dict[str, str]], bool]] = {
    "In": lambda key, values, labels: labels.get(key) in (values or []),
    "NotIn": lambda key, values, labels: labels.get(key) not in (values or []),
    "Exists": lambda key, values, labels: key in labels,
    "DoesNotExist": lambda key, values, labels: key not in labels,
}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (`matchLabels`, `matchExpressions`) selects `labels`."""
    return selector.get("matchLabels", {}).items() <= labels.items() and all(
        _SELECTOR_OPERATORS[e["operator"]](e["key"], e.get("values"), labels)
        for e in selector.get("matchExpressions") or []
    )


def policies_selecting(
    documents: list[dict[str, Any]], namespace: str | None, labels: dict[str, str], kind: str
) -> list[dict[str, Any]]:
    """The NetworkPolicies of `namespace` of type `kind` (Ingress, Egress) whose pod selector
    selects `labels`."""
    return [
        d
        for d in documents
        if d.get("kind") == "NetworkPolicy"
        and d["metadata"].get("namespace") == namespace
        and kind in d["spec"].get("policyTypes", [])
        and selects(d["spec"]["podSelector"], labels)
    ]


def _is_default_deny(policy: dict[str, Any]) -> bool:
    spec = policy["spec"]
    return (
        spec["podSelector"] == {}
        and set(spec.get("policyTypes", [])) == {"Ingress", "Egress"}
        and not spec.get("ingress")
        and not spec.get("egress")
    )


def network_problems(documents: list[dict[str, Any]]) -> list[str]:
    """Where the network is open by default: a namespace with pods and no default-deny policy
    (ingress and egress), a pod template no policy of its own (a non-empty pod selector) says
    who may reach, a pod that may not resolve names, an egress rule open on every port."""
    problems = []
    namespaces = set()
    for document in documents:
        namespace = document["metadata"].get("namespace")
        for path, labels in labelled_pods(document):
            namespaces.add(namespace)
            own = [
                p
                for p in policies_selecting(documents, namespace, labels, "Ingress")
                if p["spec"]["podSelector"]
            ]
            if not own:
                problems.append(
                    f"{_name(document)}: {path}: no NetworkPolicy selects its pods (labels "
                    f"{labels}) to say who may reach them"
                )
            egress = policies_selecting(documents, namespace, labels, "Egress")
            if not any(
                port.get("port") == 53
                for policy in egress
                for rule in policy["spec"].get("egress") or []
                for port in rule.get("ports") or []
            ):
                problems.append(f"{_name(document)}: {path}: no egress policy allows DNS")
    for namespace in sorted(namespaces, key=str):
        policies = [
            d
            for d in documents
            if d.get("kind") == "NetworkPolicy" and d["metadata"].get("namespace") == namespace
        ]
        if not any(_is_default_deny(p) for p in policies):
            problems.append(
                f"namespace {namespace}: no default-deny NetworkPolicy (all pods, in and out)"
            )
        for policy in policies:
            for index, rule in enumerate(policy["spec"].get("egress") or []):
                if not rule.get("ports"):
                    problems.append(f"{_name(policy)}: spec.egress[{index}] allows every port")
    return problems


def check(
    overlay: str,
    schemas_dir: Path,
    manifests_dir: Path = MANIFESTS_DIR,
    require_digests: bool = False,
) -> Report:
    """Render `manifests_dir/overlays/<overlay>` and check every object it holds; with
    `require_digests` (a release, once its images are pushed) every image must be pinned by
    digest, the platform's own too."""
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
        problems += restricted_problems(document)
        problems += pin_problems(document, require_digests)
    problems += network_problems(documents)
    kinds = Counter(str(d.get("kind")) for d in documents)
    return Report(overlay, dict(sorted(kinds.items())), problems)
