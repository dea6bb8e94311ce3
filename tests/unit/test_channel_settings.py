"""Bayesian optimization of channel settings: the search space as data, suggest/tell persisted
in the Optuna storage (SQLite, and the cluster's PostgreSQL), the GP improving on its random
start, refusals that name the problem and store nothing, and the daily pipeline's functions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from contentml.errors import UserError
from contentml.recipes import ConfigError
from contentml.settings import Settings
from tests.conftest import make_settings, requires_postgres
from training.revenue.channel_settings import (
    SPACE_FILE,
    ChannelSpace,
    OptimizationError,
    Parameter,
    apply_outcomes,
    ask_settings,
    best,
    load_space,
    publish_next,
    read_outcomes,
    suggest,
    tell,
)

CADENCES = ["daily", "every_other_day", "twice_weekly", "weekly"]


def state(settings: Settings, study: str, trial: int) -> TrialState:
    found = optuna.load_study(study_name=study, storage=settings.optuna_storage)
    return found.trials[trial].state


def within_space(params: dict) -> bool:
    return (
        set(params) == {"upload_hour", "video_length_seconds", "title_length", "cadence"}
        and isinstance(params["upload_hour"], int)
        and 0 <= params["upload_hour"] <= 23
        and 30 <= params["video_length_seconds"] <= 1200
        and 20 <= params["title_length"] <= 100
        and params["cadence"] in CADENCES
    )


# --- the search space --------------------------------------------------------------------


def test_the_packaged_space_is_the_four_channel_settings():
    space = load_space()
    assert list(space.parameters) == [
        "upload_hour",
        "video_length_seconds",
        "title_length",
        "cadence",
    ]
    distributions = space.distributions()
    assert distributions["upload_hour"] == optuna.distributions.IntDistribution(0, 23)
    assert distributions["video_length_seconds"] == optuna.distributions.FloatDistribution(
        30, 1200, log=True
    )
    assert distributions["title_length"] == optuna.distributions.IntDistribution(20, 100)
    assert distributions["cadence"].choices == tuple(CADENCES)
    # Each setting says why it is searched: a comment line above it.
    lines = SPACE_FILE.read_text().splitlines()
    for name in space.parameters:
        above = lines[lines.index(f"{name}:") - 1]
        assert above.startswith("# "), name


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("hour: {kind: int, low: 0, hgh: 23}", r"hour: unknown fields \['hgh'\]"),
        ("hour: {kind: integer, low: 0, high: 23}", "hour: kind must be one of"),
        ("hour: {low: 0, high: 23}", "hour: .*kind"),
        ("hour: {kind: int, low: 0}", "hour: high is needed"),
        ("hour: {kind: int, low: 0, high: 23.5}", "hour: high must be a whole number"),
        ("hour: {kind: int, low: 23, high: 0}", r"hour: low \(23\) must be below high"),
        ("hour: {kind: int, low: zero, high: 23}", "hour: low must be float or null or int"),
        ("length: {kind: float, low: 0, high: 9, log: true}", "length: low must be positive"),
        ("cadence: {kind: categorical}", "cadence: choices must list"),
        ("cadence: {kind: categorical, choices: [a, a]}", "cadence: choices must be distinct"),
        ("cadence: {kind: categorical, choices: [a], low: 1}", "cadence: low is for int"),
        ("cadence: {kind: int, low: 1, high: 2, choices: [a]}", "cadence: choices is for"),
        ("[upload_hour]", "maps each setting to its kind"),
        ("{}", "at least one setting"),
        ("", "maps each setting"),
        ("upload hour: {kind: int, low: 0, high: 23}", "'upload hour' must be an identifier"),
    ],
)
def test_a_bad_space_file_names_the_field(tmp_path: Path, entry: str, problem: str):
    path = tmp_path / "space.yaml"
    path.write_text(entry + "\n")
    with pytest.raises(ConfigError, match=problem):
        load_space(path)


def test_a_missing_space_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_space(tmp_path / "missing.yaml")


# --- suggest and tell ---------------------------------------------------------------------


def test_suggest_and_tell_persist_across_processes(settings: Settings):
    first = suggest(settings, "main")
    assert first["study"] == "main" and first["trial"] == 0
    assert within_space(first["params"])
    told = tell(settings, "main", 0, 4.2)
    assert told == {"study": "main", "trial": 0, "value": 4.2, "params": first["params"]}

    # A fresh process (as `contentml optimize suggest` is) finds the study in the storage.
    code = (
        "import json; from contentml.settings import Settings; "
        "from training.revenue.channel_settings import best, suggest; s = Settings.from_env(); "
        "print(json.dumps([suggest(s, 'main'), best(s, 'main')]))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    second, top = json.loads(child.stdout)
    assert second["trial"] == 1 and within_space(second["params"])
    assert second["params"] != first["params"]  # not the same seed again in a new process
    assert top == {
        "study": "main",
        "trial": 0,
        "value": 4.2,
        "params": first["params"],
        "complete": 1,
        "running": 1,
    }


def test_a_new_study_with_its_own_space(settings: Settings, tmp_path: Path):
    path = tmp_path / "space.yaml"
    path.write_text("upload_hour: {kind: int, low: 8, high: 10}\n")
    asked = suggest(settings, "mornings", load_space(path))
    assert set(asked["params"]) == {"upload_hour"} and 8 <= asked["params"]["upload_hour"] <= 10
    # Later calls keep the study's space, with or without naming it again.
    assert set(suggest(settings, "mornings")["params"]) == {"upload_hour"}
    assert suggest(settings, "mornings", load_space(path))["trial"] == 2
    with pytest.raises(OptimizationError, match=r"another space \(settings \['cadence'"):
        suggest(settings, "mornings", load_space())


def test_the_gp_improves_on_its_random_start():
    """Twenty days on a smooth surface: the GP's ten trials find better settings than the ten
    random start-up trials before them."""

    def rpm(p: dict) -> float:
        return (
            -(((p["upload_hour"] - 17) / 6) ** 2)
            - math.log(p["video_length_seconds"] / 480) ** 2
            - ((p["title_length"] - 55) / 30) ** 2
            + (0.5 if p["cadence"] == "every_other_day" else 0.0)
        )

    study = optuna.create_study(direction="maximize")
    distributions = load_space().distributions()
    values = []
    for _ in range(20):
        trial = ask_settings(study, distributions, seed=7)
        values.append(rpm(trial.params))
        study.tell(trial, values[-1])
    assert max(values[10:]) > max(values[:10])


@pytest.mark.parametrize(
    ("study", "trial", "value", "problem"),
    [
        ("nope", 0, 1.0, "unknown study 'nope'"),
        ("main", 7, 1.0, r"study main has no trial 7 \(its trials: 0 to 1\)"),
        ("main", -1, 1.0, "study main has no trial -1"),
        ("main", 0, 2.0, "trial 0 of study main is already COMPLETE with 3.5"),
        ("main", 1, float("nan"), "the value of trial 1 must be a finite number, not nan"),
        ("main", 1, float("inf"), "must be a finite number, not inf"),
        ("main", 1, "lots", "must be a number, not 'lots'"),
        ("../etc", 0, 1.0, "study name '../etc': 1 to 128 letters"),
        ("two words", 0, 1.0, "study name 'two words'"),
    ],
)
def test_tell_refuses_and_stores_nothing(settings: Settings, study, trial, value, problem):
    suggest(settings, "main")
    tell(settings, "main", 0, 3.5)
    suggest(settings, "main")
    with pytest.raises(OptimizationError, match=problem) as refused:
        tell(settings, study, trial, value)
    assert isinstance(refused.value, UserError)  # the CLI's one line and exit status 2
    assert state(settings, "main", 0) == TrialState.COMPLETE
    assert state(settings, "main", 1) == TrialState.RUNNING
    assert best(settings, "main")["value"] == 3.5


def test_bad_names_and_foreign_studies_are_refused(settings: Settings):
    with pytest.raises(OptimizationError, match="study name 'a/b'"):
        suggest(settings, "a/b")
    with pytest.raises(OptimizationError, match="unknown study 'fresh'"):
        best(settings, "fresh")
    suggest(settings, "fresh")
    with pytest.raises(OptimizationError, match="study fresh has no finished trial yet"):
        best(settings, "fresh")
    # A niche AutoML study in the same storage is not told channel outcomes.
    optuna.create_study(study_name="niche-music-views", storage=settings.optuna_storage).ask()
    with pytest.raises(OptimizationError, match="not a channel-settings study"):
        tell(settings, "niche-music-views", 0, 1.0)


@requires_postgres
@pytest.mark.postgres
def test_round_trip_on_postgres(tmp_path: Path, postgres_url: str):
    """The cluster's storage: a bare `postgresql://` URL, as the settings ConfigMap has it."""
    settings = make_settings(tmp_path / "state", CONTENTML_OPTUNA_STORAGE=postgres_url)
    asked = suggest(settings, "main")
    tell(settings, "main", asked["trial"], 5.0)
    again = suggest(settings, "main")
    assert (asked["trial"], again["trial"]) == (0, 1) and within_space(again["params"])
    assert best(settings, "main")["params"] == asked["params"]
    with pytest.raises(OptimizationError, match="already COMPLETE"):
        tell(settings, "main", 0, 6.0)


# --- the daily pipeline's functions ----------------------------------------------------------


def test_apply_outcomes_tells_each_running_trial_once(settings: Settings):
    a, b = suggest(settings, "a"), suggest(settings, "b")
    outcomes = pd.DataFrame(
        {"study": ["a", "b", "b"], "trial": [a["trial"], b["trial"], b["trial"]], "value": 2.0}
    )
    applied = apply_outcomes(settings, outcomes)
    assert applied == {"told": 2, "already_finished": 0, "mismatched": [], "studies": ["a", "b"]}
    assert best(settings, "b")["value"] == 2.0
    # The day's run again (a retry): nothing changes; a different value is reported, not told.
    assert apply_outcomes(settings, outcomes)["already_finished"] == 2
    outcomes.loc[0, "value"] = 9.0
    applied = apply_outcomes(settings, outcomes)
    assert applied["told"] == 0
    assert applied["mismatched"] == [{"study": "a", "trial": 0, "stored": 2.0, "file": 9.0}]
    assert best(settings, "a")["value"] == 2.0


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ({"study": ["a"], "trial": [0]}, r"outcomes lack columns \['value'\]"),
        ({"study": ["a", "a"], "trial": [0, 5], "value": [1.0, 1.0]}, "no study has: a #5"),
        ({"study": ["a", "zz"], "trial": [0, 0], "value": [1.0, 1.0]}, "unknown study 'zz'"),
        ({"study": ["a"], "trial": [0], "value": [float("nan")]}, r"row 0 \(a #0\): value"),
        ({"study": ["a"], "trial": [0.5], "value": [1.0]}, "trial must be a trial number"),
        ({"study": ["a", "a"], "trial": [0, 0], "value": [1.0, 2.0]}, "has two outcomes"),
    ],
)
def test_bad_outcomes_tell_nothing(settings: Settings, rows: dict, problem: str):
    suggest(settings, "a")
    with pytest.raises(OptimizationError, match=problem):
        apply_outcomes(settings, pd.DataFrame(rows))
    assert state(settings, "a", 0) == TrialState.RUNNING


def test_publish_next_writes_each_studys_next_settings(settings: Settings, tmp_path: Path):
    output = tmp_path / "out" / "next.json"
    first = publish_next(settings, ["a", "b", "a"], output)
    assert list(first) == ["a", "b"] and all(within_space(v["params"]) for v in first.values())
    assert json.loads(output.read_text()) == first
    assert first["a"] == {"trial": 0, "params": first["a"]["params"]}
    # No outcome yet: the same settings stay live rather than a second open trial.
    assert publish_next(settings, ["a", "b"], output) == first
    tell(settings, "a", 0, 1.0)
    assert publish_next(settings, ["a", "b"], output)["a"]["trial"] == 1


def test_outcomes_are_read_from_csv_or_parquet(tmp_path: Path):
    frame = pd.DataFrame({"study": ["2024"], "trial": [0], "value": [1.5]})
    frame.to_csv(tmp_path / "day.csv", index=False)
    frame.to_parquet(tmp_path / "day.parquet")
    for name in ("day.csv", "day.parquet"):
        assert read_outcomes(tmp_path / name).to_dict("list") == frame.to_dict("list")
    with pytest.raises(OptimizationError, match="must be a .csv or .parquet"):
        read_outcomes(tmp_path / "day.json")
    with pytest.raises(OptimizationError, match="missing.csv: no outcomes file"):
        read_outcomes(tmp_path / "missing.csv")


def test_a_space_is_built_from_parameters_too():
    space = ChannelSpace({"cadence": Parameter("categorical", choices=["daily", "weekly"])})
    assert space.to_json()["cadence"].startswith('{"name": "CategoricalDistribution"')
    with pytest.raises(ConfigError, match="at least one setting"):
        ChannelSpace({})
