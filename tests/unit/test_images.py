"""Static checks of the container images (`Dockerfile`, `Dockerfile.training`): no Docker here,
so each Dockerfile is parsed and held to what the cluster and the code expect of it."""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from contentml import cluster
from contentml.settings import PACKAGE_ROOT

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile", "Dockerfile.training")
WORKDIR = "/app"
VENV = "/opt/venv"

RUNTIME_PATHS: dict[str, str] = {
    "pyproject.toml": "the project's editable install in the image",
    "contentml": "settings, CLI, registry, deploy",
    "components": "KFP components",
    "pipelines/compiled": "contentml.launch.COMPILED_DIR",
    "training/llm/configs": "recipes, passed as paths relative to the working directory",
    "serving/caller/script_providers.yaml": "the default CONTENTML_SCRIPT_PROVIDERS",
    "serving/caller/script_providers.cluster.yaml": "the cluster's CONTENTML_SCRIPT_PROVIDERS",
    "feature_repo": "Feast definitions",
    "monitoring": "drift, retraining trigger, crisis manager",
    "manifests": "contentml deploy's templates (entrypoints.manifests.MANIFESTS_DIR)",
}
"""Paths the code reads at run time, relative to the working directory or to
`contentml.settings.PACKAGE_ROOT` (the same folder in the images): each must be in the image."""

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+_-]+)$")
_VALUE_FLAGS = {
    "-c", "--constraint", "-r", "--requirement", "-e", "--editable", "-i", "--index-url",
    "--extra-index-url", "-f", "--find-links", "--no-binary", "--only-binary",
}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped."""
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            tokens = [t for t in arguments.split() if not t.startswith("--")]
            name = tokens[2] if len(tokens) == 3 and tokens[1].upper() == "AS" else None
            stages.append(Stage(tokens[0], name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return stages


@functools.cache
def stages_of(dockerfile: str) -> list[Stage]:
    return parse((ROOT / dockerfile).read_text(encoding="utf-8"))


def copy_arguments(arguments: str) -> tuple[dict[str, str], list[str], str]:
    """COPY/ADD -> (flags, sources, destination)."""
    tokens = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
    flags = {}
    while tokens[0].startswith("--"):
        key, _, value = tokens.pop(0)[2:].partition("=")
        flags[key] = value
    *sources, destination = tokens
    return flags, sources, destination


def commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at `&&`, `;` and pipes."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    result: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            result.append([])
        else:
            result[-1].append(token)
    return [c for c in result if c]


def pip_installs(run: str) -> list[list[str]]:
    """The arguments of each `pip install` in a RUN line, up to a redirection."""
    installs = []
    for command in commands(run):
        for i, token in enumerate(command[:-1]):
            if token.rsplit("/", 1)[-1] == "pip" and command[i + 1] == "install":
                arguments = command[i + 2 :]
                ends = [j for j, a in enumerate(arguments) if a in {">", ">>", "<"}]
                installs.append(arguments[: ends[0]] if ends else arguments)
    return installs


def pins(text: str) -> dict[str, str]:
    """`name==version` pins in a text, by normalized name (PEP 503)."""
    found = re.findall(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+_-]+)", text)
    return {_normalize(name): version for name, version in found}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip().strip("/") for line in lines if line.strip() and line[0] != "#"]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (or a folder above it) out of the build context; the
    last matching pattern wins, `!` re-includes."""
    parts = Path(path.strip("/")).parts
    result = False
    for pattern in patterns:
        negated, pattern = pattern.startswith("!"), pattern.lstrip("!")
        for end in range(1, len(parts) + 1):
            candidate = "/".join(parts[:end])
            tails = [candidate]
            if pattern.startswith("**/"):
                tails = ["/".join(parts[start:end]) for start in range(end)]
            if any(fnmatch.fnmatchcase(t, pattern.removeprefix("**/")) for t in tails):
                result = not negated
    return result


def image_paths(stage: Stage) -> dict[str, str]:
    """Absolute path in the image -> repository path, for what `stage` copies from the build
    context (a folder counts with everything below it)."""
    workdir, copied = "/", {}
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = str(Path(workdir, instruction.arguments))
        if instruction.keyword != "COPY":
            continue
        flags, sources, destination = copy_arguments(instruction.arguments)
        if "from" in flags:
            continue
        target = Path(workdir, destination)
        for source in sources:
            into_folder = destination.endswith("/") and not (ROOT / source).is_dir()
            place = target / Path(source).name if into_folder else target
            copied[str(place)] = source.strip("/")
    return copied


def final_workdir(stage: Stage) -> str:
    workdir = "/"
    for argument in stage.arguments("WORKDIR"):
        workdir = str(Path(workdir, argument))
    return workdir


def environment(stage: Stage) -> dict[str, str]:
    """The ENV that `stage` sets (in `NAME=value` form)."""
    tokens = [token for argument in stage.arguments("ENV") for token in shlex.split(argument)]
    return dict(token.partition("=")[::2] for token in tokens)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_base_images_are_pinned_to_a_patch_version(dockerfile):
    stages = stages_of(dockerfile)
    names: set[str] = set()
    for stage in stages:
        if stage.image not in names:
            reference = stage.image.partition("@")[0]
            repository, _, tag = reference.rpartition(":")
            assert "$" not in stage.image, f"{dockerfile}: FROM {stage.image} is not literal"
            assert repository and "/" not in tag, f"{dockerfile}: FROM {stage.image} has no tag"
            assert tag != "latest", f"{dockerfile}: FROM {stage.image} floats"
            assert re.search(r"\d+\.\d+\.\d+", tag), (
                f"{dockerfile}: FROM {stage.image}: the tag names no exact version"
            )
        if stage.name:
            names.add(stage.name)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_builds_in_stages_and_ships_the_builders_venv(dockerfile):
    stages = stages_of(dockerfile)
    assert len(stages) >= 2, f"{dockerfile}: one stage ships its compilers and build caches"
    builder = next(s for s in stages if any(f"-m venv {VENV}" in r for r in s.arguments("RUN")))
    final = stages[-1]
    assert builder is not final, f"{dockerfile}: the venv is built in the shipped stage"
    venv_copies = [
        copy_arguments(a)
        for a in final.arguments("COPY")
        if copy_arguments(a)[0].get("from") == builder.name
    ]
    assert ([VENV], VENV) in [(s, d) for _, s, d in venv_copies], (
        f"{dockerfile}: the final stage does not copy {VENV} from {builder.name}"
    )
    # The venv's python is a link to the base image's interpreter: same image, or the CUDA
    # runtime flavour of the devel image that built it.
    assert builder.image.replace("-devel-", "-runtime-") == final.image, (
        f"{dockerfile}: venv built on {builder.image}, run on {final.image}"
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runs_as_the_clusters_numeric_non_root_user(dockerfile):
    stages = stages_of(dockerfile)
    final = stages[-1]
    users = final.arguments("USER")
    assert users, f"{dockerfile}: the image runs as root"
    every_user = [a for s in stages for a in s.arguments("USER")]
    assert every_user[-1] == users[-1]
    user = users[-1]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert re.fullmatch(r"\d+:\d+", user), f"{dockerfile}: USER {user} is not uid:gid"
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0 and gid != 0
    assert uid == cluster.RUN_AS_USER, f"{dockerfile}: USER {uid}, pods run as RUN_AS_USER"
    # The uid has an account (ssh, and HOME, need one).
    runs = " ".join(final.arguments("RUN"))
    assert re.search(rf"useradd [^&;]*--uid {uid} --gid {gid}\b", runs), (
        f"{dockerfile}: no account for uid {uid}"
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_sources_are_in_the_build_context(dockerfile):
    patterns = dockerignore()
    for stage in stages_of(dockerfile):
        for keyword in ("COPY", "ADD"):
            for argument in stage.arguments(keyword):
                flags, sources, _ = copy_arguments(argument)
                if "from" in flags:
                    continue
                for source in sources:
                    assert "://" not in source and not source.startswith("git@"), (
                        f"{dockerfile}: {keyword} {source} fetches at build time, unchecked"
                    )
                    assert list(ROOT.glob(source.strip("/"))), f"{dockerfile}: no {source}"
                    assert not ignored(source, patterns), (
                        f"{dockerfile}: {source} is excluded by .dockerignore"
                    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_pip_installs_are_pinned_and_agree_with_the_lock(dockerfile):
    locked = pins((ROOT / "constraints.txt").read_text(encoding="utf-8"))
    locked |= pins((ROOT / "Makefile").read_text(encoding="utf-8"))  # pip, setuptools, wheel
    installs = 0
    for stage in stages_of(dockerfile):
        copied_constraints = False
        for instruction in stage.instructions:
            if instruction.keyword == "COPY" and "constraints.txt" in instruction.arguments:
                copied_constraints = True
            if instruction.keyword != "RUN":
                continue
            for arguments in pip_installs(instruction.arguments):
                installs += 1
                _check_pip_install(dockerfile, arguments, locked, copied_constraints)
    assert installs >= 4


def _check_pip_install(dockerfile: str, arguments: list[str], locked: dict, copied: bool):
    constraints, requirement_files, requirements, local = [], [], [], []
    i = 0
    while i < len(arguments):
        flag, equals, value = arguments[i].partition("=")
        if flag in _VALUE_FLAGS and not equals:
            i += 1
            value = arguments[i]
        if flag in ("-c", "--constraint"):
            constraints.append(value)
        elif flag in ("-r", "--requirement"):
            requirement_files.append(value)
        elif flag in ("-e", "--editable"):
            local.append(value)
        elif not flag.startswith("-"):
            (local if arguments[i].startswith((".", "/")) else requirements).append(arguments[i])
        i += 1
    line = f"{dockerfile}: pip install {' '.join(arguments)}"
    assert constraints in ([], ["constraints.txt"]), line
    assert not constraints or copied, f"{line}: constraints.txt is not copied in yet"
    assert constraints or not requirement_files, f"{line}: requirements without constraints"
    assert constraints or "--no-deps" in arguments or not local, f"{line}: unpinned dependencies"
    for requirement in requirements:
        match = _PIN.match(requirement)
        assert match, f"{line}: {requirement} is not pinned with =="
        name, version = _normalize(match[1]), match[2]
        if name in locked:
            assert version.partition("+")[0] == locked[name].partition("+")[0], (
                f"{line}: {name}=={version}, but the lock (constraints.txt, Makefile) pins "
                f"{locked[name]}"
            )


SECRET_FILES = (
    ".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", "id_ecdsa*", ".netrc",
    ".git-credentials", ".pypirc", "basic_auth.ini", "kubeconfig", "*.kubeconfig", "credentials",
    "credentials.*", "*.p12", "*.pfx", "*.db", "*.sqlite", "mlflow.db",
)  # fmt: skip
"""Names of files that hold credentials or local state (MLflow's SQLite store, .env files,
keys): none may reach an image."""
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY", "API_KEY", "CREDENTIAL")


def build_context_files(dockerfile: str) -> list[str]:
    """The repository files that the Dockerfile's COPY and ADD send into an image (a folder
    with everything below it), less what .dockerignore keeps out."""
    patterns, files = dockerignore(), set()
    for stage in stages_of(dockerfile):
        for argument in stage.arguments("COPY") + stage.arguments("ADD"):
            flags, sources, _ = copy_arguments(argument)
            if "from" in flags:
                continue
            for source in sources:
                for match in ROOT.glob(source.strip("/")):
                    found = [match] if match.is_file() else match.rglob("*")
                    files.update(f.relative_to(ROOT).as_posix() for f in found if f.is_file())
    return sorted(f for f in files if not ignored(f, patterns))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_no_secret_reaches_an_image(dockerfile):
    """No credential file or local state is copied in, and no ENV or ARG carries a credential
    (both stay in the image's history)."""
    files = build_context_files(dockerfile)
    assert "contentml/settings.py" in files
    for path in files:
        name = path.rsplit("/", 1)[-1]
        assert not any(fnmatch.fnmatchcase(name, p) for p in SECRET_FILES), (
            f"{dockerfile} copies {path} into the image"
        )
        assert not {".contentml", "mlruns", ".git"} & set(path.split("/")), path
    for stage in stages_of(dockerfile):
        for keyword in ("ENV", "ARG"):
            for argument in stage.arguments(keyword):
                for token in shlex.split(argument):
                    name = token.partition("=")[0].upper()
                    assert not any(word in name for word in SECRET_WORDS), (
                        f"{dockerfile}: {keyword} {name} puts a credential in the image"
                    )


def test_dockerignore_keeps_local_state_out():
    patterns = dockerignore()
    for path in (".venv", ".contentml", ".git", "tests", ".contentml/mlflow.db"):
        assert ignored(path, patterns), f".dockerignore sends {path} to the build"
    for path in ("contentml/settings.py", "README.md", "manifests/base/kustomization.yaml"):
        assert not ignored(path, patterns), f".dockerignore keeps {path} out"


def test_the_runtime_paths_table_covers_what_the_code_reads():
    from contentml.launch import COMPILED_DIR
    from contentml.settings import Settings
    from entrypoints.manifests import MANIFESTS_DIR
    from training.llm.config import CONFIGS

    read = [MANIFESTS_DIR, COMPILED_DIR, CONFIGS, Settings.from_env({}).script_providers]
    for path in read:
        relative = path.relative_to(PACKAGE_ROOT).as_posix()
        assert relative in RUNTIME_PATHS, f"{relative} is read at run time: add it to the table"
    for path in RUNTIME_PATHS:
        assert (ROOT / path).exists(), f"RUNTIME_PATHS names {path}, which is not in the repo"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runtime_paths_are_in_the_image_under_its_working_directory(dockerfile):
    final = stages_of(dockerfile)[-1]
    assert final_workdir(final) == WORKDIR
    copied = image_paths(final)
    for path in RUNTIME_PATHS:
        image_path = f"{WORKDIR}/{path}"
        holders = [p for p in copied if image_path == p or image_path.startswith(p + "/")]
        assert holders, f"{dockerfile}: {path} ({RUNTIME_PATHS[path]}) is not in {WORKDIR}"
        source = copied[holders[0]] + image_path.removeprefix(holders[0])
        assert source == path, f"{dockerfile}: {image_path} holds {source}"
    # Editable: Python imports the code from /app, where PACKAGE_ROOT then finds manifests/.
    installs = [set(a) for r in final.arguments("RUN") for a in pip_installs(r)]
    assert {"-e", "."} in [i & {"-e", "."} for i in installs], (
        f"{dockerfile}: the project is not installed (editable) from {WORKDIR}"
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_labels_name_the_source_and_the_version(dockerfile):
    final = stages_of(dockerfile)[-1]
    labels = dict(
        token.partition("=")[::2] for a in final.arguments("LABEL") for token in shlex.split(a)
    )
    for key in ("source", "title", "licenses", "version"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"{dockerfile}: no {key} label"
    project = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'^version = "([^"]+)"', project, re.MULTILINE)[1]
    assert labels["org.opencontainers.image.version"] == version


def test_platform_image_is_the_contentml_command():
    final = stages_of("Dockerfile")[-1]
    # The ServingRuntime and the Feast Deployment give only arguments (`serve ...`).
    assert [json.loads(a) for a in final.arguments("ENTRYPOINT")] == [["contentml"]]
    assert json.loads(final.arguments("CMD")[-1])[0] == "serve"
    assert "8080" in final.arguments("EXPOSE")


def test_compiled_tasks_run_the_kfp_of_the_image():
    """No compiled task starts with KFP's `pip install kfp`: each runs the kfp the image has
    (pinned in constraints.txt), and as uid 1000 it could not write to the image's venv."""
    assert "kfp" in pins((ROOT / "constraints.txt").read_text(encoding="utf-8"))
    for compiled in sorted((ROOT / "pipelines" / "compiled").glob("*.yaml")):
        text = compiled.read_text(encoding="utf-8")
        assert "kfp.dsl.executor_main" in text, compiled.name
        assert "pip install" not in text, f"{compiled.name} installs packages when a task starts"


def test_training_image_serves_the_runtimes_sshd_and_launcher():
    final = stages_of("Dockerfile.training")[-1]
    # The runtime gives the node pods sshd and the launcher mpirun as commands.
    assert not final.arguments("ENTRYPOINT")
    runtime = ROOT / "manifests" / "base" / "training" / "deepspeed-runtime.yaml"
    documents = [d for d in yaml.safe_load_all(runtime.read_text(encoding="utf-8")) if d]
    spec = next(d for d in documents if d["kind"] == "TrainingRuntime")["spec"]
    home = str(Path(spec["mlPolicy"]["mpi"]["sshAuthMountPath"]).parent)
    assert environment(final)["HOME"] == home, "the runtime mounts the ssh keys in another HOME"
    node = next(j for j in spec["template"]["spec"]["replicatedJobs"] if j["name"] == "node")
    container = node["template"]["spec"]["template"]["spec"]["containers"][0]
    sshd_config = container["args"][container["args"].index("-f") + 1]
    copied = [copy_arguments(a)[2] for a in final.arguments("COPY")]
    assert sshd_config in copied, f"Dockerfile.training does not install {sshd_config}"
    # The pods' root filesystem is read-only and HOME an emptyDir, which would hide it.
    assert not sshd_config.startswith(home + "/"), f"{sshd_config} is under HOME"
    # sshd gives the ranks it starts a fresh environment: the image's ENV must be in SetEnv.
    set_env = [i for i, x in enumerate(final.instructions) if "SetEnv" in x.arguments]
    assert set_env and sshd_config in final.instructions[set_env[0]].arguments
    last_env = max(i for i, x in enumerate(final.instructions) if x.keyword == "ENV")
    assert set_env[0] > last_env, "ENV after the SetEnv line does not reach the ranks"
    handed = final.instructions[set_env[0]].arguments
    for name in environment(final):
        assert f"{name}=${name}" in handed, f"{name} does not reach the ranks over ssh"
