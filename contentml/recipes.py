"""Training recipes as data: frozen dataclasses read from YAML, every field type-checked, so a
typo in a recipe fails at load time with the field's name, not an hour into training."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from types import NoneType
from typing import Any, TypeVar

import yaml

from contentml.errors import UserError

Recipe = TypeVar("Recipe")


class ConfigError(UserError):
    """A training recipe has a value training cannot use."""


def check_field_types(config: Any, error: type[Exception] = ConfigError) -> None:
    """Raise `error` naming the first field of the dataclass `config` whose value does not
    have its declared type: every recipe's and config's check (the script providers' too).

    A float field takes ints; `bool` is not taken for an int (`epochs: true` is a mistake, not
    1 epoch); a `list[str]` field takes a list of strings, a `tuple[...]` field a tuple.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        allowed = _accepted_types(hints[f.name])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join(_type_name(t) for t in dict.fromkeys(allowed))
            raise error(f"{f.name} must be {names}, not {value!r}")
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise error(f"{f.name} must be a list of strings, not {value!r}")


def load_recipe(cls: type[Recipe], path: Path | None = None, **overrides: Any) -> Recipe:
    """`cls` from a YAML file of its fields (defaults for the rest), with `overrides` (those
    not None) on top."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the recipe: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of {cls.__name__} fields")
    values |= {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown recipe fields {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        # YAML 1.1 reads `5e-5` (no dot) as a string; it is the usual way to write a rate.
        if float in _accepted_types(hints[name]) and isinstance(value, str):
            try:
                values[name] = float(value)
            except ValueError:
                pass  # left for the type check to name
    return cls(**values)


def _accepted_types(hint: Any) -> tuple[type, ...]:
    """`int | None` -> (int, NoneType); `list[str]` -> (list,); a float field takes ints."""
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return (origin,)
    types = typing.get_args(hint) or (hint,)
    return (*types, int) if float in types else types


def _type_name(accepted: type) -> str:
    """How an error names a type: YAML's words for None and sequences."""
    if accepted is NoneType:
        return "null"
    return "a list" if accepted in (list, tuple) else accepted.__name__
