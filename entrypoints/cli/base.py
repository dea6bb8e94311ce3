"""What every command module of the CLI uses: the parser class, argument types and output."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from contentml.errors import UserError

QUIET_ENVIRONMENT = {
    # mlflow sets its own logger's level on import, so only this setting quiets its INFO lines.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


USAGE_ERROR = 2
"""Exit status for bad arguments or requests, as argparse uses."""


class UsageError(Exception):
    """Bad arguments: reported on one line with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message}")


def print_json(value) -> None:
    print(json.dumps(value, indent=None, default=str))


def write_yaml(manifest: dict, output: str | None) -> None:
    """A manifest as `kubectl apply -f` reads it, to the file `output` or stdout."""
    import yaml

    text = yaml.safe_dump(manifest, sort_keys=False)
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        print(text, end="")


def minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of minutes: {text!r}") from None
    if not 0 < value <= 24 * 60:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1440, not {value}")
    return value


def model_name(text: str) -> str:
    """A model name as `contentml.names` allows it, checked before anything opens the registry
    (which would create its database in a fresh home)."""
    from contentml import names

    try:
        return names.model_name(text)
    except UserError as e:  # a ValueError: argparse would print a generic message
        raise argparse.ArgumentTypeError(str(e)) from None


def model_names(text: str) -> list[str]:
    return [model_name(part.strip()) for part in text.split(",")]


def iso_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, not {port}")
    return port


def percent(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole percent: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be within 0..100, not {value}")
    return value


def at_least(minimum: int):
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


positive_int = at_least(1)


count_int = at_least(0)
