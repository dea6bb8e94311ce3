"""The cluster's MLflow tracking server (`manifests/base/mlflow/deployment.yaml`), started only
with a safe authentication configuration.

`python -m entrypoints.mlflow_server OPTIONS...` reads the basic-auth configuration with MLflow's
own reader (`MLFLOW_AUTH_CONFIG_PATH`, the `MLFLOW_AUTH_ADMIN_*` variables before the file) and
refuses to start, exit status 1, when the admin password is empty, MLflow's former default or
shorter than MLflow's minimum, or when the user store is SQLite: MLflow itself checks the
password only while the admin user does not exist yet, and older versions shipped
`password1234`. Then it replaces itself with `mlflow server OPTIONS...`. Messages name the
setting and where it comes from, never its value.
"""

from __future__ import annotations

import configparser
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from contentml.errors import UserError

DEFAULT_ADMIN_PASSWORD = "password1234"
"""The admin password that older MLflow versions shipped in `basic_auth.ini`
(https://github.com/advisories/GHSA-gq3w-7jj3-x7gr)."""

MIN_PASSWORD_LENGTH = 12
"""MLflow's own minimum (`mlflow.utils.validation._validate_password`), which it applies only
when it creates a user."""

AUTH_APP = "basic-auth"
CONFIG_PATH_VARIABLE = "MLFLOW_AUTH_CONFIG_PATH"
PASSWORD_VARIABLE = "MLFLOW_AUTH_ADMIN_PASSWORD"
USERNAME_VARIABLE = "MLFLOW_AUTH_ADMIN_USERNAME"


class UnsafeAuthConfig(UserError):
    """The MLflow server would start with authentication that anyone can pass."""


def _source(variable: str, key: str, path: Path, environ: Mapping[str, str]) -> str:
    """Where MLflow takes an admin setting from: a variable that is set wins, even empty."""
    return variable if variable in environ else f"`{key}` in {path}"


def auth_problems() -> list[str]:
    """What makes the basic-auth configuration in this process's environment unsafe (an empty
    list when nothing does), read by MLflow's own reader. No value is part of a message."""
    from mlflow.server.auth.config import read_auth_config

    environ = os.environ
    if not environ.get(CONFIG_PATH_VARIABLE):
        return [
            f"{CONFIG_PATH_VARIABLE} is not set: MLflow would use the basic_auth.ini it ships "
            "(SQLite user store, no admin password); mount the Secret's basic_auth.ini"
        ]
    path = Path(environ[CONFIG_PATH_VARIABLE])
    if not os.access(path, os.R_OK) or not path.is_file():
        return [f"{path} does not exist or cannot be read"]
    try:
        config = read_auth_config()
    except KeyError as e:
        return [f"{path} has no [mlflow] section or no {e} in it"]
    except (configparser.Error, UnicodeDecodeError) as e:
        # The exception's text may quote a value: only its type is shown.
        return [f"{path} cannot be read as MLflow reads it ({type(e).__name__})"]
    problems = []
    if not config.admin_username:
        where = _source(USERNAME_VARIABLE, "admin_username", path, environ)
        problems.append(f"the admin username ({where}) is empty or not set")
    password = config.admin_password
    where = _source(PASSWORD_VARIABLE, "admin_password", path, environ)
    if not password:
        problems.append(f"the admin password ({where}) is empty or not set")
    elif password == DEFAULT_ADMIN_PASSWORD:
        problems.append(
            f"the admin password ({where}) is MLflow's former default, which everyone knows "
            "(GHSA-gq3w-7jj3-x7gr)"
        )
    elif len(password) < MIN_PASSWORD_LENGTH:
        problems.append(
            f"the admin password ({where}) is shorter than {MIN_PASSWORD_LENGTH} characters, "
            "MLflow's minimum"
        )
    if config.database_uri.startswith("sqlite"):
        problems.append(
            f"`database_uri` in {path} is SQLite: the users would live in one pod's file, lost "
            "on restart and not shared between replicas; use PostgreSQL"
        )
    return problems


def _auth_app(options: Sequence[str]) -> str | None:
    """The `--app-name` among `mlflow server` options."""
    for i, option in enumerate(options):
        if option.startswith("--app-name="):
            return option.partition("=")[2]
        if option == "--app-name" and i + 1 < len(options):
            return options[i + 1]
    return None


def check(options: Sequence[str]) -> None:
    """Raise `UnsafeAuthConfig` unless `mlflow server OPTIONS` would run with basic auth and a
    safe admin configuration."""
    problems = []
    if _auth_app(options) != AUTH_APP:
        problems.append(f"the server would run without authentication: pass --app-name={AUTH_APP}")
    problems += auth_problems()
    if problems:
        raise UnsafeAuthConfig(
            "refusing to start the MLflow server: " + "; ".join(problems) + " (docs/deploy.md, 2)"
        )


def server_command(options: Sequence[str]) -> list[str]:
    """`mlflow server OPTIONS` of this interpreter's MLflow (no PATH lookup)."""
    return [sys.executable, "-m", "mlflow", "server", *options]


def main(argv: Sequence[str] | None = None) -> None:
    """Check the configuration, then become `mlflow server` (same process, so the pod's signals
    and exit status are the server's)."""
    options = list(sys.argv[1:] if argv is None else argv)
    try:
        check(options)
    except UnsafeAuthConfig as e:
        print(f"entrypoints.mlflow_server: {e}", file=sys.stderr)
        raise SystemExit(1) from e
    command = server_command(options)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
