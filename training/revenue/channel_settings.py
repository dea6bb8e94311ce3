"""Bayesian optimization of a channel's settings (upload hour, video length, title length,
posting cadence) by Optuna's ask/tell with a Gaussian-process sampler.

A trial is one set of settings that goes live for a day; its value is what the channel earned
with them (the day's mean RPM). `suggest` asks for the next settings, `tell` reports a day's
outcome, and the daily `optimization` pipeline does both for every study
(`apply_outcomes`, then `publish_next`). Studies live in `settings.optuna_storage` (SQLite
locally, PostgreSQL in the cluster), so every call may come from a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)
from optuna.trial import FrozenTrial, TrialState

from contentml.errors import UserError
from contentml.recipes import ConfigError, check_field_types
from contentml.settings import Settings

SPACE_FILE = Path(__file__).with_suffix(".yaml")
"""The packaged search space: a new study searches it unless told otherwise."""

SPACE_ATTR = "channel_settings_space"
"""Study user attribute holding the space a study searches (Optuna's JSON per parameter); it
also marks the study as a channel-settings study, not one of the niche searches beside it."""

SEED = 0
"""Base seed of the sampler. Each call is a fresh process with a fresh sampler, seeded with
`SEED`, a checksum of the study's name and its trial count: the random start-up trials differ
from trial to trial and from study to study, and stay replayable."""

STUDY_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
OUTCOME_COLUMNS = ("study", "trial", "value")


class OptimizationError(UserError):
    """A suggest/tell request names an unknown study or trial, or brings an unusable value."""


class Kind(StrEnum):
    INT = "int"
    FLOAT = "float"
    CATEGORICAL = "categorical"


@dataclass(frozen=True)
class Parameter:
    """One channel setting the optimizer tunes (an entry of `channel_settings.yaml`)."""

    kind: str
    """`int` or `float`: a range from `low` to `high`, both included; `categorical`: one of
    `choices`."""

    low: float | None = None
    """Smallest value of a range (an integer for `int`)."""

    high: float | None = None
    """Largest value of a range (an integer for `int`)."""

    log: bool = False
    """Search the range on a log scale: where ratios matter (30 s against 60 s), not
    differences. Needs `low` > 0."""

    choices: list[str] = field(default_factory=list)
    """The values of a `categorical` setting."""

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.kind not in set(Kind):
            raise ConfigError(f"kind must be one of {[str(k) for k in Kind]}, not {self.kind!r}")
        if self.kind == Kind.CATEGORICAL:
            self._check_choices()
        else:
            self._check_range()

    def _check_choices(self) -> None:
        if not self.choices:
            raise ConfigError("choices must list the values of a categorical setting")
        if len(set(self.choices)) != len(self.choices):
            raise ConfigError(f"choices must be distinct, not {self.choices}")
        for name in ("low", "high"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name} is for int and float settings, not categorical")
        if self.log:
            raise ConfigError("log is for int and float settings, not categorical")

    def _check_range(self) -> None:
        if self.choices:
            raise ConfigError(f"choices is for categorical settings, not {self.kind}")
        for name in ("low", "high"):
            value = getattr(self, name)
            if value is None:
                raise ConfigError(f"{name} is needed by a {self.kind} setting")
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, not {value}")
            if self.kind == Kind.INT and value != int(value):
                raise ConfigError(f"{name} must be a whole number for an int setting, not {value}")
        if not self.low < self.high:
            raise ConfigError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and not self.low > 0:
            raise ConfigError(f"low must be positive on a log scale, not {self.low}")

    def distribution(self) -> BaseDistribution:
        return KIND_TO_DISTRIBUTION[Kind(self.kind)](self)


KIND_TO_DISTRIBUTION: dict[Kind, Callable[[Parameter], BaseDistribution]] = {
    Kind.INT: lambda p: IntDistribution(int(p.low), int(p.high), log=p.log),
    Kind.FLOAT: lambda p: FloatDistribution(float(p.low), float(p.high), log=p.log),
    Kind.CATEGORICAL: lambda p: CategoricalDistribution(p.choices),
}


@dataclass(frozen=True)
class ChannelSpace:
    """The settings a study searches, by name."""

    parameters: dict[str, Parameter]

    def __post_init__(self) -> None:
        if not isinstance(self.parameters, dict) or not self.parameters:
            raise ConfigError("a search space needs at least one setting")
        for name, parameter in self.parameters.items():
            if not (isinstance(name, str) and name.isidentifier()):
                raise ConfigError(f"setting name {name!r} must be an identifier (snake_case)")
            if not isinstance(parameter, Parameter):
                raise ConfigError(f"{name} must be a Parameter, not {parameter!r}")

    def distributions(self) -> dict[str, BaseDistribution]:
        return {name: p.distribution() for name, p in self.parameters.items()}

    def to_json(self) -> dict[str, str]:
        """What a study stores in `SPACE_ATTR`."""
        return {name: distribution_to_json(d) for name, d in self.distributions().items()}


def load_space(path: Path | None = None) -> ChannelSpace:
    """The search space from a YAML file mapping each setting to its `Parameter` fields
    (the packaged `channel_settings.yaml` by default); a bad entry is named with its field."""
    path = SPACE_FILE if path is None else Path(path)
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the search space: {e}") from e
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ConfigError(f"{path}: a search space maps each setting to its kind and range")
    known = sorted(Parameter.__dataclass_fields__)
    parameters = {}
    for name, values in entries.items():
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{path}: {name}: unknown fields {unknown}; known: {known}")
        try:
            parameters[name] = Parameter(**values)
        except TypeError as e:  # `kind` missing
            raise ConfigError(f"{path}: {name}: {e}") from e
        except ConfigError as e:
            raise ConfigError(f"{path}: {name}: {e}") from e
    try:
        return ChannelSpace(parameters)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


# --- ask and tell ---------------------------------------------------------------------------


def channel_sampler(seed: int) -> optuna.samplers.GPSampler:
    """The sampler of every channel-settings study: a GP (Matern 5/2, log EI; q-batch EI over
    the trials still running). Its first `n_startup_trials` (10) trials are random."""
    return optuna.samplers.GPSampler(seed=seed)


def ask_settings(
    study: optuna.Study, distributions: dict[str, BaseDistribution], seed: int = SEED
) -> optuna.Trial:
    """A new trial of `study` over `distributions`, from a fresh sampler (as a fresh process
    has), seeded with `seed` plus the study's trial count."""
    study.sampler = channel_sampler(seed + len(study.get_trials(deepcopy=False)))
    return study.ask(distributions)


def suggest(settings: Settings, study: str, space: ChannelSpace | None = None) -> dict:
    """Start a trial of `study`, created on first use (maximising, over `space`, by default the
    packaged one; an existing study keeps its own space, which `space` must then equal).
    Returns {"study", "trial", "params"}: the settings to put live."""
    with _storage(settings) as storage:
        found = _study(storage, study, create=True, space=space)
        trial = ask_settings(found, _distributions(found, space), _seed(study))
        return {"study": study, "trial": trial.number, "params": trial.params}


def tell(settings: Settings, study: str, trial: int, value: float) -> dict:
    """Report the outcome of a running trial; refuses (storing nothing) an unknown study or
    trial, a finished one, and a value that is not a finite number."""
    value = _finite(value, f"the value of trial {trial}")
    with _storage(settings) as storage:
        found = _study(storage, study)
        frozen = _trial(found, study, trial)
        if frozen.state != TrialState.RUNNING:
            told = f" with {frozen.value}" if frozen.value is not None else ""
            raise OptimizationError(
                f"trial {trial} of study {study} is already {frozen.state.name}{told}; a trial "
                f"takes one outcome (ask for a new one with suggest)"
            )
        found.tell(trial, value)
        return {"study": study, "trial": trial, "value": value, "params": frozen.params}


def best(settings: Settings, study: str) -> dict:
    """The best finished trial: {"study", "trial", "value", "params", "complete", "running"}."""
    with _storage(settings) as storage:
        found = _study(storage, study)
        trials = found.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise OptimizationError(f"study {study} has no finished trial yet: tell one first")
        top = max(complete, key=lambda t: t.value)
        return {
            "study": study,
            "trial": top.number,
            "value": top.value,
            "params": top.params,
            "complete": len(complete),
            "running": sum(t.state == TrialState.RUNNING for t in trials),
        }


def has_study(settings: Settings, study: str) -> bool:
    with _storage(settings) as storage:
        return study in optuna.study.get_all_study_names(storage)


# --- the daily pipeline -------------------------------------------------------------------


def read_outcomes(path: Path) -> pd.DataFrame:
    """A CSV or parquet file of the day's outcomes (columns `study`, `trial`, `value`)."""
    path = Path(path)
    readers = {".csv": lambda p: pd.read_csv(p, dtype={"study": str}), ".parquet": pd.read_parquet}
    if path.suffix not in readers:
        raise OptimizationError(f"{path}: outcomes must be a .csv or .parquet file")
    if not path.exists():
        raise OptimizationError(f"{path}: no outcomes file")
    return readers[path.suffix](path)


def apply_outcomes(settings: Settings, outcomes: pd.DataFrame) -> dict:
    """Tell each running trial its outcome (a row of `study`, `trial`, `value`: the channel's
    mean RPM over the day its settings were live). Every row is checked before any is told.
    A trial already finished is skipped, so a rerun of the day changes nothing; `mismatched`
    lists those whose stored value differs from the file's.

    Returns {"told", "already_finished", "mismatched", "studies"}."""
    rows = _outcome_rows(outcomes)
    names = sorted({study for study, _, _ in rows})
    with _storage(settings) as storage:
        studies = {name: _study(storage, name) for name in names}
        trials = {name: _trials_by_number(studies[name]) for name in names}
        missing = [f"{s} #{t}" for s, t, _ in rows if t not in trials[s]]
        if missing:
            raise OptimizationError(f"outcomes name trials no study has: {', '.join(missing)}")
        waiting = [f"{s} #{t}" for s, t, _ in rows if trials[s][t].state == TrialState.WAITING]
        if waiting:
            raise OptimizationError(f"outcomes name trials never started: {', '.join(waiting)}")
        told, finished, mismatched = 0, 0, []
        for study, number, value in rows:
            trial = trials[study][number]
            if trial.state.is_finished():
                finished += 1
                if trial.value != value:
                    mismatched.append(
                        {"study": study, "trial": number, "stored": trial.value, "file": value}
                    )
                continue
            studies[study].tell(number, value)
            told += 1
    return {
        "told": told,
        "already_finished": finished,
        "mismatched": mismatched,
        "studies": names,
    }


def publish_next(settings: Settings, studies: list[str], output: Path) -> dict:
    """The settings each study puts live next: its running trial if one still waits for its
    outcome (after a day without outcomes, or on a rerun, nothing new is asked), else a new
    trial over the space the study was created with (the packaged one for a new study).
    Writes {study: {"trial", "params"}} as JSON to `output` and returns it."""
    published = {}
    with _storage(settings) as storage:
        for name in dict.fromkeys(studies):  # each once, in the given order
            found = _study(storage, name, create=True)
            running = found.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if running:
                trial = max(running, key=lambda t: t.number)
            else:
                trial = ask_settings(found, _distributions(found, None), _seed(name))
            published[name] = {"trial": trial.number, "params": trial.params}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(published, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return published


# --- helpers --------------------------------------------------------------------------------


@contextlib.contextmanager
def _storage(settings: Settings) -> Iterator[optuna.storages.RDBStorage]:
    """The Optuna storage of `settings` (SQLite's folder made on first use), its connections
    closed afterwards. SQLAlchemy 2.1 reads a bare `postgresql://` URL (the cluster's) with
    psycopg 3, the driver the platform installs."""
    url = settings.optuna_storage
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(url)
    try:
        yield storage
    finally:
        storage.engine.dispose()


def _seed(study: str) -> int:
    return (SEED + zlib.crc32(study.encode())) % 2**30


def _check_name(study: str) -> None:
    if not (isinstance(study, str) and STUDY_NAME.fullmatch(study)):
        raise OptimizationError(
            f"study name {study!r}: 1 to 128 letters, digits, '-' or '_' (no spaces)"
        )


def _study(
    storage: optuna.storages.RDBStorage,
    name: str,
    *,
    create: bool = False,
    space: ChannelSpace | None = None,
) -> optuna.Study:
    """The channel-settings study `name`; with `create`, a new one over `space` (the packaged
    space by default) where none exists."""
    _check_name(name)
    if create:
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
        except optuna.exceptions.DuplicatedStudyError:
            pass  # it exists: checked below
        else:
            study.set_user_attr(SPACE_ATTR, (space or load_space()).to_json())
            return study
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise OptimizationError(
            f"unknown study {name!r}: `contentml optimize suggest --study {name}` starts it"
        ) from None
    if SPACE_ATTR not in study.user_attrs:
        raise OptimizationError(
            f"study {name!r} is not a channel-settings study (another search made it)"
        )
    return study


def _distributions(study: optuna.Study, space: ChannelSpace | None) -> dict:
    """The space `study` was created with; `space`, where given, must be that one."""
    stored = study.user_attrs[SPACE_ATTR]
    if space is not None and space.to_json() != stored:
        wanted = space.to_json()
        changed = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
        raise OptimizationError(
            f"study {study.study_name} searches another space (settings {changed} differ); a "
            f"study keeps its space: start a new study to search this one"
        )
    return {name: json_to_distribution(text) for name, text in stored.items()}


def _trials_by_number(study: optuna.Study) -> dict[int, FrozenTrial]:
    return {t.number: t for t in study.get_trials(deepcopy=False)}


def _trial(study: optuna.Study, name: str, number: int) -> FrozenTrial:
    trials = _trials_by_number(study)
    if isinstance(number, bool) or not isinstance(number, numbers.Integral) or number not in trials:
        known = f"0 to {len(trials) - 1}" if trials else "none yet"
        raise OptimizationError(f"study {name} has no trial {number!r} (its trials: {known})")
    return trials[number]


def _finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptimizationError(f"{what} must be a number, not {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise OptimizationError(f"{what} must be a finite number, not {value!r}")
    return number


def _outcome_rows(outcomes: pd.DataFrame) -> list[tuple[str, int, float]]:
    """(study, trial, value) per row, each checked; a pair given twice with one value counts
    once, with two values is an error."""
    missing = [c for c in OUTCOME_COLUMNS if c not in outcomes.columns]
    if missing:
        raise OptimizationError(
            f"outcomes lack columns {missing}; they need {list(OUTCOME_COLUMNS)}"
        )
    rows: dict[tuple[str, int], float] = {}
    for index, (study, trial, value) in enumerate(
        outcomes[list(OUTCOME_COLUMNS)].itertuples(index=False, name=None)
    ):
        where = f"outcome row {index}"
        if not (isinstance(study, str) and STUDY_NAME.fullmatch(study)):
            raise OptimizationError(f"{where}: bad study name {study!r}")
        number = _finite(trial, f"{where}: trial")
        if number != int(number) or number < 0:
            raise OptimizationError(f"{where}: trial must be a trial number, not {trial!r}")
        number = int(number)
        value = _finite(value, f"{where} ({study} #{number}): value")
        if rows.setdefault((study, number), value) != value:
            raise OptimizationError(
                f"{where}: {study} #{number} has two outcomes, {rows[(study, number)]} and {value}"
            )
    return [(study, number, value) for (study, number), value in rows.items()]
