"""Registering toy model versions on a real MLflow registry, running the CLI in-process against
given settings, and child processes that start bare, for the tests of the registry and of what
reads it."""

from __future__ import annotations

import hashlib
import multiprocessing
from multiprocessing.context import BaseContext
from pathlib import Path

import mlflow

from contentml import registry
from contentml.settings import Settings
from entrypoints.cli import main
from tests.conftest import make_settings


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[float], params=None) -> list[float]:
        return [1.0 for _ in model_input]


def register(settings, name: str, python_model=None, signature=None) -> str:
    client = registry.connect(settings)
    with mlflow.start_run(experiment_id=registry.experiment_id(client, settings)):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model or Constant(),
            signature=signature,
            registered_model_name=name,
            pip_requirements=["mlflow"],  # inferring them runs a child process: seconds each
        )
    return str(info.registered_model_version)


def register_versions(settings, name: str, count: int) -> list[str]:
    return [register(settings, name) for _ in range(count)]


def shared_backend(request, tmp_path: Path, tracking_uri: str) -> Settings:
    """Settings on a backend the module's tests share (PostgreSQL, a tracking server). Its
    experiment keeps the artifact root it was created with, and versions elsewhere are refused
    (`registry.stored_artifact_uri`), so the tests share one root too."""
    key = hashlib.blake2b(tracking_uri.encode(), digest_size=6).hexdigest()
    root = request.getfixturevalue("tmp_path_factory").getbasetemp() / f"artifacts-{key}"
    return make_settings(
        tmp_path / "state",
        MLFLOW_TRACKING_URI=tracking_uri,
        CONTENTML_MLFLOW_ARTIFACT_ROOT=str(root),
    )


def cli(settings, monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """`contentml ARGV` in this process against `settings`: status, stdout, stderr. The status
    is the process's exit status, argparse's own refusals (exit 2) included."""
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


PRELOADED = (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
)


def children(*preload: str) -> BaseContext:
    """Child processes forked from a server that imported MLflow and the `preload` modules (the
    caller's, whose functions the children run) once: each starts bare like a separate command,
    in a fraction of a second rather than seconds."""
    context = multiprocessing.get_context("forkserver")
    # Taking effect when this process starts its server; MLflow imports its stores lazily.
    context.set_forkserver_preload([__name__, *preload, *PRELOADED])
    return context
