"""Starting a pipeline run by name, from its compiled package: on the cluster's KFP API, or on
this machine as a `contentml pipeline run NAME --local` child process. What a caller below the
entry points (the retraining trigger, a KFP task itself) needs to start a training run, without
importing the pipelines' definitions: the packages `contentml pipeline compile` wrote are in
the repository and in the platform image."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from contentml import cluster
from contentml.errors import UserError
from contentml.settings import PACKAGE_ROOT, Settings

COMPILED_DIR = PACKAGE_ROOT / "pipelines" / "compiled"
"""Where `contentml pipeline compile` writes the YAML that the KFP UI uploads."""

CLI_MODULE = "entrypoints.cli"
"""The `contentml` command, as `python -m` runs it in a child process."""


class PipelineError(UserError):
    """A pipeline request names an unknown pipeline or parameter."""


def compiled_package(name: str) -> Path:
    """The compiled package of the pipeline `name`; `PipelineError` for an unknown name."""
    path = COMPILED_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in COMPILED_DIR.glob("*.yaml")))
        raise PipelineError(f"unknown pipeline {name!r}; known: {known}")
    return path


def spawn_local(
    settings: Settings,
    name: str,
    arguments: dict[str, Any],
    log: Path,
    environment: dict[str, str] | None = None,
    detached: bool = False,
) -> subprocess.Popen:
    """`contentml pipeline run NAME --local` as a child process, its output in `log`;
    `environment` is added to this process's and the settings'; a `detached` child outlives
    this process."""
    compiled_package(name)  # an unknown name fails here, not in the background
    log.parent.mkdir(parents=True, exist_ok=True)
    params = [item for key, value in arguments.items() for item in ("--param", f"{key}={value}")]
    command = [sys.executable, "-m", CLI_MODULE, "pipeline", "run", name, "--local", *params]
    with log.open("wb") as output:
        return subprocess.Popen(
            command,
            env={**os.environ, **settings.to_env(), **(environment or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=detached,
        )


def start_local(settings: Settings, name: str, arguments: dict[str, Any]) -> str:
    """Start `contentml pipeline run NAME --local` in the background (a monitor must not wait
    for a training run); returns where to follow it: the process id and its log file."""
    log = settings.home / "kfp" / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    process = spawn_local(settings, name, arguments, log, detached=True)
    return f"local pid {process.pid}, log {log}"


def kfp_client(settings: Settings, purpose: str) -> Any:
    """A `kfp.Client` for `settings.kfp_host`; `PipelineError` saying `purpose` needs one
    when it is unset."""
    if not settings.kfp_host:
        raise PipelineError(f"{purpose} needs the cluster's KFP: set KFP_HOST")
    import kfp

    return kfp.Client(host=settings.kfp_host)


def submit_package(
    settings: Settings, package: Path, arguments: dict[str, Any], client: Any = None
) -> str:
    """Start a run of the compiled `package` on the cluster's KFP; returns the run id (visible
    in the KFP UI). `client`: a `kfp.Client` (default: one for `settings.kfp_host`)."""
    if client is None:
        client = kfp_client(settings, "running on the cluster")
    run = client.create_run_from_pipeline_package(
        str(package),
        arguments=arguments,
        experiment_name="contentml",
        service_account=cluster.SERVICE_ACCOUNT,
    )
    return run.run_id


def launch_pipeline(settings: Settings, name: str, arguments: dict[str, Any]) -> str:
    """The project's launcher (`monitoring.retrain.Launch`): the KFP API when `kfp_host` is
    set (returns the run id), else kfp.local in a background process (returns its process id
    and log file)."""
    if settings.kfp_host:
        return submit_package(settings, compiled_package(name), arguments)
    return start_local(settings, name, arguments)
