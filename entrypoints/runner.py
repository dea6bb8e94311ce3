"""Compile and run the KFP pipelines: locally through kfp.local, or on the cluster's KFP API."""

from __future__ import annotations

import builtins
import contextlib
import importlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler

from contentml import cluster, launch
from contentml.launch import COMPILED_DIR, PipelineError
from contentml.settings import Settings
from monitoring.retrain import MONITORING_EXPERIMENT, TriggerError, check_name

PIPELINES: dict[str, str] = {
    "training": "pipelines.training:training",
    "quality-training": "pipelines.quality:quality_training",
    "niche-automl": "pipelines.niche:niche_automl",
    "script-finetune": "pipelines.script:script_finetune",
    "monitoring": "pipelines.monitoring:monitoring",
    "optimization": "pipelines.optimization:optimization",
}
"""Pipeline name (as in the KFP UI) -> `module:function` of the pipeline function. Imported
when asked for: KFP builds a pipeline's graph when its module is imported, which costs
seconds in a process that has loaded much (its tasks' `inspect.stack()`), so a run builds
only the pipeline it runs."""


class PipelineFailed(RuntimeError):
    """A task of a pipeline run failed; its log above says why."""


def pipeline(name: str) -> Callable:
    """The pipeline function called `name` in the KFP UI."""
    try:
        module, function = PIPELINES[name].split(":")
    except KeyError:
        raise PipelineError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}") from None
    return getattr(importlib.import_module(module), function)


def compile_all(output_dir: Path = COMPILED_DIR) -> list[Path]:
    """Write one YAML per pipeline; the KFP UI's "Upload pipeline" takes these files."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PIPELINES:
        path = output_dir / f"{name}.yaml"
        compiler.Compiler().compile(pipeline(name), str(path))
        written.append(path)
    return written


def parse_arguments(name: str, pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> typed pipeline arguments, checked against the pipeline's inputs."""
    inputs = pipeline(name).component_spec.inputs or {}
    raw = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in inputs:
            raise PipelineError(
                f"bad parameter {pair!r}; {name} takes {', '.join(f'{k}=' for k in inputs)}"
            )
        raw[key] = value
    return typed_arguments(name, raw)


_ACCEPTED: dict[type, tuple[type, ...]] = {
    int: (str, int),
    float: (str, int, float),
    str: (str, int, float),
}


def typed_arguments(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Pipeline arguments cast to the types of the pipeline's inputs; an unknown name or a
    value of the wrong type is an error that names it."""
    inputs = pipeline(name).component_spec.inputs or {}
    casts = {"Integer": int, "Float": float, "String": str}
    arguments = {}
    for key, value in raw.items():
        if key not in inputs:
            raise PipelineError(
                f"bad parameter {key!r}; {name} takes {', '.join(f'{k}=' for k in inputs)}"
            )
        cast = casts.get(str(inputs[key].type), str)
        try:
            # YAML values come typed: a string is parsed, a number kept if it fits; a bool,
            # null, list or 2.5 for an int is refused, not coerced to 1, "None" or 2.
            if isinstance(value, bool) or not isinstance(value, _ACCEPTED[cast]):
                raise TypeError(value)
            arguments[key] = cast(value)
        except (TypeError, ValueError):
            raise PipelineError(f"parameter {key} needs a {cast.__name__}, not {value!r}") from None
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
        # Locally the tasks run in this environment, not in the cluster's platform image, and
        # on this machine's CPUs whatever the cluster's requests (pipelines/platform.py).
        warnings.filterwarnings("ignore", message=".*non-Python base image")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner")
        printing = builtins.print
        try:
            # kfp.local prints task logs on stdout; stdout is kept for the run's result.
            with contextlib.redirect_stdout(sys.stderr):
                task = pipeline(name)(**arguments)
        except RuntimeError as e:
            raise PipelineFailed(str(e)) from e
        finally:
            # kfp.local indents a task's logs by swapping `builtins.print` for the task; two
            # ParallelFor tasks at once restore each other's swap, and every later print of
            # this process stayed indented (a CLI's JSON in a test after the niche pipeline).
            builtins.print = printing
    return task.output


def submit(settings: Settings, name: str, arguments: dict[str, Any]) -> str:
    """Start a run of the pipeline as this code defines it on the cluster's KFP; returns the
    run id (visible in the KFP UI)."""
    with tempfile.TemporaryDirectory() as folder:
        package = Path(folder) / f"{name}.yaml"
        compiler.Compiler().compile(pipeline(name), str(package))
        return launch.submit_package(settings, package, arguments)


_CRON_FIELDS = 6
_RUN_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class RecurringRun:
    """A KFP recurring run, as `manifests/base/pipelines/schedules.yaml` lists them."""

    name: str
    """Its name in the KFP UI; scheduling again replaces the recurring run of this name."""

    pipeline: str
    """A name of `PIPELINES`."""

    cron: str
    """KFP's cron: six fields, seconds first (`0 0 * * * *` is hourly)."""

    params: dict[str, Any] = field(default_factory=dict)
    """The pipeline's arguments; the others keep their defaults."""

    description: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and _RUN_NAME.fullmatch(self.name)):
            raise PipelineError(f"recurring run name {self.name!r}: lower-case letters, digits, -")
        pipeline(self.pipeline)
        if not isinstance(self.cron, str) or len(self.cron.split()) != _CRON_FIELDS:
            raise PipelineError(
                f"recurring run {self.name}: cron {self.cron!r} must have six fields, seconds "
                f"first ('0 0 * * * *' is hourly)"
            )
        if not isinstance(self.params, dict):
            raise PipelineError(f"recurring run {self.name}: params must be a mapping")
        object.__setattr__(self, "params", typed_arguments(self.pipeline, self.params))
        # KFP accepts a run without an input that has no default; every run then fails.
        inputs = pipeline(self.pipeline).component_spec.inputs or {}
        missing = [k for k, spec in inputs.items() if not spec.optional and k not in self.params]
        if missing:
            raise PipelineError(
                f"recurring run {self.name}: {self.pipeline} needs {', '.join(missing)}"
            )


def load_schedules(path: Path) -> list[RecurringRun]:
    """The recurring runs a YAML file lists, each checked against its pipeline."""
    try:
        items = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise PipelineError(f"{path}: not a readable YAML file: {e}") from e
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise PipelineError(f"{path}: must be a list of recurring runs (name, pipeline, cron)")
    known = {f.name for f in RecurringRun.__dataclass_fields__.values()}
    runs = []
    for item in items:
        unknown = set(item) - known
        if unknown:
            raise PipelineError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        try:
            runs.append(RecurringRun(**item))
        except TypeError as e:  # a missing required key
            raise PipelineError(f"{path}: {item.get('name', item)}: {e}") from e
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise PipelineError(f"{path}: recurring run names must be unique: {names}")
    return runs


def schedule(
    settings: Settings, runs: list[RecurringRun], experiment: str = "contentml", client: Any = None
) -> dict[str, str]:
    """Make KFP's recurring runs of `experiment` named like `runs` match them (KFP cannot
    update one: a recurring run of the same name is deleted and created again); returns
    {name: recurring run id}. One run at a time per schedule, no catch-up of missed runs.
    `client`: a `kfp.Client` (default: one for `settings.kfp_host`)."""
    if client is None:
        client = launch.kfp_client(settings, "scheduling")
    experiment_id = client.create_experiment(experiment).experiment_id
    listing = client.list_recurring_runs(experiment_id=experiment_id, page_size=200)
    existing: dict[str, list[str]] = {}
    for found in listing.recurring_runs or []:
        existing.setdefault(found.display_name, []).append(found.recurring_run_id)
    scheduled = {}
    with tempfile.TemporaryDirectory() as folder:
        # Every package compiles (once per pipeline) before any recurring run is replaced.
        packages = {}
        for name in dict.fromkeys(run.pipeline for run in runs):
            packages[name] = Path(folder) / f"{name}.yaml"
            compiler.Compiler().compile(pipeline(name), str(packages[name]))
        for run in runs:
            for old in existing.get(run.name, []):
                client.delete_recurring_run(old)
            created = client.create_recurring_run(
                experiment_id=experiment_id,
                job_name=run.name,
                description=run.description or f"{run.pipeline} on {run.cron}",
                cron_expression=run.cron,
                max_concurrency=1,
                no_catchup=True,
                params=run.params,
                pipeline_package_path=str(packages[run.pipeline]),
                enable_caching=False,
                service_account=cluster.SERVICE_ACCOUNT,
            )
            scheduled[run.name] = created.recurring_run_id
    return scheduled


HOURLY = "0 0 * * * *"
"""KFP's cron has six fields, seconds first: at minute 0 of every hour."""


def schedule_monitoring(
    settings: Settings,
    model: str,
    reference_path: str,
    current_path: str,
    cron: str = HOURLY,
    client: Any = None,
) -> str:
    """Create the recurring `monitoring` run for `model` on the cluster's KFP; returns the
    recurring run's id. Each run checks the drift of the file at `current_path` as it is then
    (its window id is the file's content); one run at a time, no catch-up of missed runs.
    `client`: a `kfp.Client` (default: one for `settings.kfp_host`)."""

    check_name("model", model)
    try:
        run = RecurringRun(
            name=f"monitoring-{model}",
            pipeline="monitoring",
            cron=cron,
            params={
                "model": model,
                "reference_path": reference_path,
                "current_path": current_path,
                "window_id": "",
                "current_metric": "",
            },
            description=f"drift check and retraining trigger for {model}",
        )
        scheduled = schedule(settings, [run], MONITORING_EXPERIMENT, client)
    except PipelineError as e:
        raise TriggerError(str(e)) from e
    return scheduled[run.name]
