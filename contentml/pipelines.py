"""Compile and run the KFP pipelines: locally through kfp.local, or on the cluster's KFP API."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfp import compiler

from contentml.errors import UserError
from contentml.settings import Settings
from pipelines.monitoring import monitoring
from pipelines.niche import niche_automl
from pipelines.quality import quality_training
from pipelines.script import script_finetune
from pipelines.training import training

PIPELINES: dict[str, Callable] = {
    "training": training,
    "quality-training": quality_training,
    "niche-automl": niche_automl,
    "script-finetune": script_finetune,
    "monitoring": monitoring,
}
"""Pipeline name (as in the KFP UI) -> pipeline function."""

COMPILED_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "compiled"
"""Where `contentml pipeline compile` writes the YAML that the KFP UI uploads."""


class PipelineError(UserError):
    """A pipeline request names an unknown pipeline or parameter."""


class PipelineFailed(RuntimeError):
    """A task of a pipeline run failed; its log above says why."""


def pipeline(name: str) -> Callable:
    try:
        return PIPELINES[name]
    except KeyError:
        raise PipelineError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}") from None


def compile_all(output_dir: Path = COMPILED_DIR) -> list[Path]:
    """Write one YAML per pipeline; the KFP UI's "Upload pipeline" takes these files."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, function in PIPELINES.items():
        path = output_dir / f"{name}.yaml"
        compiler.Compiler().compile(function, str(path))
        written.append(path)
    return written


def parse_arguments(name: str, pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> typed pipeline arguments, checked against the pipeline's inputs."""
    inputs = pipeline(name).component_spec.inputs or {}
    casts = {"Integer": int, "Float": float, "String": str}
    arguments = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in inputs:
            raise PipelineError(
                f"bad parameter {pair!r}; {name} takes {', '.join(f'{k}=' for k in inputs)}"
            )
        cast = casts.get(str(inputs[key].type), str)
        try:
            arguments[key] = cast(raw)
        except ValueError:
            raise PipelineError(f"parameter {key} needs a {cast.__name__}, not {raw!r}") from None
    return arguments


def run_local(settings: Settings, name: str, arguments: dict[str, Any]) -> dict:
    """Run a pipeline on this machine with kfp.local; returns the pipeline's output."""
    from kfp import local

    # Every task is a child process: give it the same settings as this one.
    os.environ.update(settings.to_env())
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(settings.home / "kfp")
    )
    with warnings.catch_warnings():
        # Locally the tasks run in this environment, not in the cluster's platform image.
        warnings.filterwarnings("ignore", message=".*non-Python base image")
        try:
            # kfp.local prints task logs on stdout; stdout is kept for the run's result.
            with contextlib.redirect_stdout(sys.stderr):
                task = pipeline(name)(**arguments)
        except RuntimeError as e:
            raise PipelineFailed(str(e)) from e
    return task.output


def start_local(settings: Settings, name: str, arguments: dict[str, Any]) -> str:
    """Start `contentml pipeline run NAME --local` in the background (a monitor must not wait
    for a training run); returns where to follow it: the process id and its log file."""
    pipeline(name)  # an unknown name fails here, not in the background
    log = settings.home / "kfp" / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    params = [item for key, value in arguments.items() for item in ("--param", f"{key}={value}")]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "contentml.cli", "pipeline", "run", name, "--local", *params],
            env={**os.environ, **settings.to_env()},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command
        )
    return f"local pid {process.pid}, log {log}"


def submit(settings: Settings, name: str, arguments: dict[str, Any]) -> str:
    """Start a run on the cluster's KFP; returns the run id (visible in the KFP UI)."""
    import kfp

    client = kfp.Client(host=settings.kfp_host)
    run = client.create_run_from_pipeline_func(
        pipeline(name), arguments=arguments, experiment_name="contentml"
    )
    return run.run_id
