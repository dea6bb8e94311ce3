"""Settings: embedded defaults under one folder, every value overridable from the environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from contentml.settings import Settings, SettingsError


def test_embedded_defaults_live_under_home(tmp_path: Path):
    settings = Settings.from_env({"CONTENTML_HOME": str(tmp_path)})
    assert settings.home == tmp_path
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert settings.optuna_storage == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert Path(settings.feast_registry).is_relative_to(tmp_path)
    assert settings.feast_online_store == "sqlite"
    assert settings.kfp_host == ""


def test_cluster_values_come_from_the_environment(tmp_path: Path):
    environ = {
        "CONTENTML_HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc:5000",
        "CONTENTML_MLFLOW_ARTIFACT_ROOT": "s3://contentml-artifacts/mlflow",
        "CONTENTML_FEAST_ONLINE_STORE": "redis",
        "CONTENTML_FEAST_REDIS_URL": "redis.feast.svc:6379",
        "KFP_HOST": "http://ml-pipeline.kubeflow.svc:8888",
    }
    settings = Settings.from_env(environ)
    assert settings.mlflow_tracking_uri == "http://mlflow.mlflow.svc:5000"
    assert settings.mlflow_artifact_root == "s3://contentml-artifacts/mlflow"
    assert settings.feast_online_store == "redis"
    assert settings.kfp_host.startswith("http://ml-pipeline")


def test_to_env_round_trips(tmp_path: Path):
    settings = Settings.from_env(
        {"CONTENTML_HOME": str(tmp_path), "KFP_HOST": "http://kfp", "CONTENTML_ACCESS_LOG": "Yes"}
    )
    assert settings.access_log is True
    assert Settings.from_env(settings.to_env()) == settings


def test_every_field_is_documented_and_has_an_environment_variable():
    source = Path(__file__).parents[2].joinpath("contentml", "settings.py").read_text()
    for field in dataclasses.fields(Settings):
        assert field.metadata["env"]
        assert f"    {field.name}:" in source
    names = [f.metadata["env"] for f in dataclasses.fields(Settings)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"CONTENTML_FEAST_ONLINE_STORE": "memcached"}, "must be 'sqlite' or 'redis'"),
        ({"MLFLOW_TRACKING_URI": ""}, "mlflow_tracking_uri must not be empty"),
        ({"CONTENTML_SCRIPT_MAX_TOKENS": "lots"}, "CONTENTML_SCRIPT_MAX_TOKENS must be an int"),
        ({"CONTENTML_SCRIPT_MAX_TOKENS": "0"}, "script_max_tokens must be positive, not 0"),
        ({"CONTENTML_SCRIPT_TIMEOUT_SECONDS": "1m"}, "TIMEOUT_SECONDS must be a float, not '1m'"),
        ({"CONTENTML_SERVING_POLL_SECONDS": "0"}, "serving_poll_seconds must be positive"),
        ({"CONTENTML_ACCESS_LOG": "sometimes"}, "CONTENTML_ACCESS_LOG must be true or false"),
        ({"CONTENTML_PINNED_VERSIONS": "trend"}, "takes MODEL=VERSION"),
        ({"CONTENTML_PINNED_VERSIONS": "trend=v2"}, "takes MODEL=VERSION"),
        # The message names the scheme only: the URL may carry a password.
        ({"CONTENTML_EVENT_BUS": "kafka://u:secret@k:9092"}, r"sql or redis://.*not a kafka: URL$"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, environ, problem):
    with pytest.raises(SettingsError, match=problem):
        Settings.from_env({"CONTENTML_HOME": str(tmp_path), **environ})


def test_pinned_versions_parse(tmp_path: Path):
    settings = Settings.from_env(
        {"CONTENTML_HOME": str(tmp_path), "CONTENTML_PINNED_VERSIONS": "trend=3, niche-global=1"}
    )
    assert settings.pinned() == {"trend": "3", "niche-global": "1"}
    assert Settings.from_env({"CONTENTML_HOME": str(tmp_path)}).pinned() == {}
