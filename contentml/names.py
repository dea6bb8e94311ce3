"""Checks of the names and paths that reach the registry, the artifact store and URIs built from
them (`models:/NAME/VERSION`, artifact folders), and of the names the model server's routes
keep state under (bandit experiments, channels): one function per kind of name, used by every
caller before anything is read or written. Each returns the value as it is stored, or raises
`NameRefused` saying what is wrong with it.

Names are letters, digits, `_`, `-` and `.` (a bandit experiment's also `:`), starting with a
letter or digit, with no `..`: no path separators, no percent-escapes that a URI layer could
decode into one, no control characters. Registered models and experiments created outside these
rules cannot be named through the platform.
"""

from __future__ import annotations

import re
from enum import StrEnum

from contentml.errors import UserError


class Alias(StrEnum):
    """The roadmap's three versions per model: the registry's aliases, named here so that code
    which only names them (the CLI's parser) need not import MLflow."""

    CHAMPION = "champion"  # stable: what serving loads
    CHALLENGER = "challenger"  # candidate: newest trained, waiting for the gate
    EXPERIMENTAL = "experimental"


MAX_NAME_LENGTH = 128
"""Registered model and experiment names; MLflow's columns take 256, Kubernetes labels 63."""

MAX_VERSION = 2**31 - 1
"""MLflow stores versions as 32-bit integers."""

MAX_VERSION_DIGITS = len(str(MAX_VERSION))
"""Checked before the digits are read as a number: Python refuses to convert more than 4,300
(ValueError), and reading thousands costs time for nothing."""

MAX_ARTIFACT_PATH_LENGTH = 1024

MAX_REVENUE_EXPERIMENT_LENGTH = 200
"""The revenue store's name column (`training.revenue.store.MAX_NAME`)."""

MAX_CHANNEL_ID_LENGTH = 64
"""YouTube's channel ids have 24 characters, the trending data's hashed ones 15."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_REVENUE_EXPERIMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_ARTIFACT_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*")
_VERSION = re.compile(r"[1-9][0-9]*")

_FORBIDDEN = {
    "\x00": "a NUL byte",
    "\\": "a backslash",
    "%": "a '%' (a URL-encoded character)",
    "/": "a '/'",
}
"""Characters named in the error rather than lumped into "outside the safe set"."""


class NameRefused(UserError):
    """A name, version or path that is not allowed where it was given."""


def _shown(value: str) -> str:
    # An over-long name would flood the one-line error.
    return repr(value) if len(value) <= 80 else f"{value[:60]!r}... ({len(value)} characters)"


def _problem(
    value: str, allowed: re.Pattern, max_length: int, separator: str | None, symbols: str
) -> str | None:
    """What is wrong with `value`, most specific first, or None."""
    if not value:
        return "it is empty"
    if len(value) > max_length:
        return f"it is longer than {max_length} characters"
    if separator and value.startswith(separator):
        return "it is absolute"
    if ".." in value:
        return "it contains '..'"
    for character, described in _FORBIDDEN.items():
        if character != separator and character in value:
            return f"it contains {described}"
    if not allowed.fullmatch(value):
        parts = f" in parts between single {separator!r}" if separator else ""
        return (
            f"it may only hold letters, digits, {symbols}{parts}, starting with a letter or digit"
        )
    return None


def _checked(
    kind: str,
    value: object,
    allowed: re.Pattern,
    max_length: int,
    separator: str | None = None,
    symbols: str = "'_', '-' and '.'",
) -> str:
    if not isinstance(value, str):
        raise NameRefused(f"{kind} must be text, not {type(value).__name__}")
    problem = _problem(value, allowed, max_length, separator, symbols)
    if problem is not None:
        raise NameRefused(f"{kind} {_shown(value)} is refused: {problem}")
    return value


def model_name(name: object) -> str:
    """A registered model's name."""
    return _checked("model name", name, _NAME, MAX_NAME_LENGTH)


def experiment_name(name: object) -> str:
    """An MLflow experiment's name."""
    return _checked("experiment name", name, _NAME, MAX_NAME_LENGTH)


def revenue_experiment_name(name: object) -> str:
    """A RevenueOptimizer experiment's name (the bandits' store): `:` is allowed too, and up to
    the store's column width."""
    return _checked(
        "experiment name",
        name,
        _REVENUE_EXPERIMENT,
        MAX_REVENUE_EXPERIMENT_LENGTH,
        symbols="'_', '-', '.' and ':'",
    )


def channel_id(value: object) -> str:
    """A channel's id, as the CrisisManager routes keep its metrics and quarantine under."""
    return _checked("channel id", value, _NAME, MAX_CHANNEL_ID_LENGTH)


def version(value: object) -> str:
    """A registered model version: a whole number from 1, as text without leading zeros."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not (
        isinstance(value, str)
        and len(value) <= MAX_VERSION_DIGITS
        and _VERSION.fullmatch(value)
        and int(value) <= MAX_VERSION
    ):
        shown = _shown(value) if isinstance(value, str) else repr(value)
        raise NameRefused(
            f"model version {shown} is refused: it must be a whole number from 1 to "
            f"{MAX_VERSION}, without leading zeros"
        )
    return value


def artifact_path(path: object) -> str:
    """A path inside a version's artifacts (as its MLmodel file records one): relative, its
    parts names, so it never leaves the version's folder."""
    return _checked("artifact path", path, _ARTIFACT_PATH, MAX_ARTIFACT_PATH_LENGTH, "/")


# --- niche models ---------------------------------------------------------------------------

NICHE_MODEL_PREFIX = "niche-"
"""Registered niche models are named `niche-<slug>`; the niche router serves each of them."""

GLOBAL_NICHE = "global"
"""The niche whose model answers every category that has no model of its own."""


def niche_slug(niche: str) -> str:
    """`Howto & Style` -> `howto-style`: registered model names and URLs take it."""
    return re.sub(r"[^a-z0-9]+", "-", niche.lower()).strip("-")


def niche_model_name(niche: str) -> str:
    """The registered model of a niche (a name or its slug): `niche-<slug>`."""
    return f"{NICHE_MODEL_PREFIX}{niche_slug(niche)}"


def comma_list(text: str) -> list[str]:
    """The non-empty comma-separated parts of `text`, stripped: how a CLI flag or a pipeline
    parameter names several things (niches, families, ensemble members)."""
    return [part.strip() for part in text.split(",") if part.strip()]
