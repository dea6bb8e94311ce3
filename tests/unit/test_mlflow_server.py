"""The MLflow server's start-up check (`entrypoints.mlflow_server`): it refuses an empty, default or
short admin password, a SQLite user store and a server without auth, naming the setting and
never its value; otherwise it becomes `mlflow server`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from contentml.settings import PACKAGE_ROOT
from entrypoints import mlflow_server
from entrypoints.mlflow_server import UnsafeAuthConfig

PASSWORD = "correct-horse-battery-staple"
OPTIONS = ["--host=0.0.0.0", "--port=5000", "--app-name=basic-auth"]
SETTINGS = {
    "default_permission": "READ",
    "database_uri": "postgresql+psycopg://auth:db-secret@postgres:5432/mlflow_auth",
    "admin_username": "admin",
    "admin_password": PASSWORD,
}


def write_ini(path, settings: dict[str, str | None], section: str = "mlflow") -> None:
    lines = [f"[{section}]"] + [f"{k} = {v}" for k, v in settings.items() if v is not None]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def ini(tmp_path, monkeypatch):
    """A safe basic_auth.ini, named by MLFLOW_AUTH_CONFIG_PATH; no admin variables set."""
    path = tmp_path / "basic_auth.ini"
    write_ini(path, SETTINGS)
    monkeypatch.setenv(mlflow_server.CONFIG_PATH_VARIABLE, str(path))
    for variable in (mlflow_server.PASSWORD_VARIABLE, mlflow_server.USERNAME_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    return path


def test_a_safe_configuration_passes(ini):
    assert mlflow_server.auth_problems() == []
    mlflow_server.check(OPTIONS)


@pytest.mark.parametrize(
    ("settings", "environ", "problem", "secret"),
    [
        ({"admin_password": ""}, {}, "admin password (`admin_password` in", None),
        ({"admin_password": None}, {}, "is empty or not set", None),
        ({"admin_password": "password1234"}, {}, "MLflow's former default", "password1234"),
        ({"admin_password": "hunter2"}, {}, "shorter than 12 characters", "hunter2"),
        ({}, {"MLFLOW_AUTH_ADMIN_PASSWORD": ""}, "(MLFLOW_AUTH_ADMIN_PASSWORD) is empty", None),
        (
            {},
            {"MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"},
            "(MLFLOW_AUTH_ADMIN_PASSWORD) is MLflow's former default",
            "password1234",
        ),
        ({"admin_username": ""}, {}, "admin username (`admin_username` in", None),
        ({"database_uri": "sqlite:///basic_auth.db"}, {}, "is SQLite", None),
        ({"database_uri": None}, {}, "no [mlflow] section or no 'database_uri'", None),
        # A lone % breaks MLflow's reader; its error would quote the value.
        (
            {"admin_password": "pa%ss-word-long-enough"},
            {},
            "cannot be read as MLflow reads it (InterpolationSyntaxError)",
            "pa%ss-word-long-enough",
        ),
    ],
)
def test_an_unsafe_setting_is_named_and_its_value_is_not(
    ini, monkeypatch, settings, environ, problem, secret
):
    write_ini(ini, {**SETTINGS, **settings})
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(UnsafeAuthConfig) as raised:
        mlflow_server.check(OPTIONS)
    message = str(raised.value)
    assert problem in message
    for value in (PASSWORD, "db-secret", secret):
        assert value is None or value not in message


def test_a_missing_or_unset_configuration_is_refused(ini, monkeypatch, tmp_path):
    write_ini(ini, SETTINGS, section="auth")
    assert "has no [mlflow] section" in mlflow_server.auth_problems()[0]
    monkeypatch.setenv(mlflow_server.CONFIG_PATH_VARIABLE, str(tmp_path / "absent.ini"))
    assert "does not exist or cannot be read" in mlflow_server.auth_problems()[0]
    monkeypatch.delenv(mlflow_server.CONFIG_PATH_VARIABLE)
    assert "MLFLOW_AUTH_CONFIG_PATH is not set" in mlflow_server.auth_problems()[0]


@pytest.mark.parametrize(
    "options",
    [["--host=0.0.0.0"], ["--app-name=other"], ["--app-name"]],
)
def test_a_server_without_basic_auth_is_refused(ini, options):
    with pytest.raises(UnsafeAuthConfig, match="pass --app-name=basic-auth"):
        mlflow_server.check(options)
    mlflow_server.check(["--app-name", "basic-auth"])


def test_main_becomes_mlflow_server_or_exits_1(ini, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(os, "execvp", lambda file, args: started.append((file, args)))
    mlflow_server.main(OPTIONS)
    assert started == [(sys.executable, [sys.executable, "-m", "mlflow", "server", *OPTIONS])]

    started.clear()
    write_ini(ini, {**SETTINGS, "admin_password": "password1234"})
    with pytest.raises(SystemExit) as raised:
        mlflow_server.main(OPTIONS)
    assert raised.value.code == 1 and not started
    err = capsys.readouterr().err
    assert "refusing to start the MLflow server" in err and "password1234" not in err


def _run(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "entrypoints.mlflow_server", *options],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
        check=False,
    )


def test_the_module_runs_as_the_pods_command(ini):
    """As in the Deployment: `python -m entrypoints.mlflow_server ...` execs the real
    `mlflow server` (`--help` stops it there), or refuses before it."""
    done = _run("--app-name=basic-auth", "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout and "--backend-store-uri" in done.stdout
    write_ini(ini, {**SETTINGS, "admin_password": ""})
    done = _run("--app-name=basic-auth", "--help")
    assert done.returncode == 1 and "Usage" not in done.stdout
    assert "the admin password (`admin_password` in" in done.stderr


def test_the_deploy_guides_basic_auth_ini_passes_once_its_password_is_filled_in(ini):
    guide = (PACKAGE_ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```ini\n(.*?)```", guide, flags=re.S)
    ini.write_text(example, encoding="utf-8")
    assert any("admin password" in p for p in mlflow_server.auth_problems())  # `...` is short
    ini.write_text(example.replace("admin_password = ...", f"admin_password = {PASSWORD}"))
    assert mlflow_server.auth_problems() == []
