"""The README's commands that need no trained model, run as written in a fresh home: the batch
jobs and costs, the channel-settings optimization, the experiments and models listings, the
script providers' status. The
training commands run at small budgets through the pipelines they call (test_e2e.py,
test_pipelines.py, the demo), and each serving call in test_e2e.py's server."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.helpers.batch import trend_items
from tests.helpers.readme import README, shell_lines
from tests.helpers.registry import cli

NO_MODEL_COMMANDS = (
    "batch ",
    "costs ",
    "optimize ",
    "experiments list",
    "models list",
    "providers status",
)
"""README commands (after `contentml`) that run without a trained model."""


def readme_commands() -> list[list[str]]:
    """Each README line running one of `NO_MODEL_COMMANDS`, as `contentml`'s arguments."""
    commands = []
    for line in shell_lines(README):
        if line.startswith(".venv/bin/contentml "):
            argv = shlex.split(line.split("#")[0])[1:]
            if " ".join(argv).startswith(NO_MODEL_COMMANDS):
                commands.append(argv)
    return commands


@pytest.fixture
def home(tmp_path: Path) -> Path:
    make_settings(tmp_path / "state")
    (tmp_path / "items.json").write_text(json.dumps(trend_items(3)))
    return tmp_path


def test_the_readme_lists_the_commands_run_here():
    started = {" ".join(argv).split(" ")[0] for argv in readme_commands()}
    assert started == {"batch", "costs", "optimize", "experiments", "models", "providers"}


def test_the_readme_commands_without_a_model_run_as_written(home: Path, monkeypatch, capsys):
    # In this process: a dozen `contentml` processes would spend a minute importing.
    monkeypatch.chdir(home)  # the README's relative files (items.json) are here
    settings = make_settings(home / "state")
    answers = {}
    job_id = None
    for argv in readme_commands():
        argv = [job_id if word == "JOB_ID" else word for word in argv]
        exit_status, out, err = cli(settings, monkeypatch, capsys, *argv)
        assert exit_status == 0, (argv, err[-2000:])
        answers[" ".join(argv[:3])] = out
        if argv[:2] == ["batch", "submit"]:
            job_id = json.loads(out)["job_id"]
    assert job_id and len(job_id) == 32
    status = json.loads(answers[f"batch status {job_id}"])
    assert status["job_id"] == job_id and status["total"] == 3 and status["priority"] == "urgent"
    assert status["channel"] == "garden"
    assert json.loads(answers[f"batch results {job_id}"]) == []  # no worker ran yet
    assert json.loads(answers["batch dlq list"]) == []
    assert json.loads(answers["costs --json --since"])["days"] == []
    suggested = json.loads(answers["optimize suggest --study"])
    best = json.loads(answers["optimize best --study"])
    assert best["value"] == 4.7 and best["params"] == suggested["params"]
    assert json.loads(answers["models list --json"]) == []
    (ours,) = json.loads(answers["providers status --json"])["providers"]
    assert (ours["name"], ours["keys"], ours["requests_today"]) == ("contentml", 1, 0)
