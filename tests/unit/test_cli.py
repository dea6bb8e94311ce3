"""The CLI's contract for bad input: exit status 2 and one line that names the problem."""

from __future__ import annotations

import pytest

from entrypoints.cli import main


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTENTML_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("KFP_HOST", raising=False)


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        ([], "required: command"),
        (["fly"], "invalid choice: 'fly'"),
        (["serve", "--port", "abc"], "not a port number: 'abc'"),
        (["serve", "--port", "70000"], "port must be 1..65535"),
        (["promote", "trend", "x"], "not an integer: 'x'"),
        (["promote", "trend", "1", "--to", "boss"], "invalid choice: 'boss'"),
        (["demo", "--max-series", "0"], "must be at least 1"),
        (["pipeline", "run", "nope", "--local"], "unknown pipeline 'nope'"),
        (["pipeline", "run", "training", "--local", "--param", "x=1"], "bad parameter 'x=1'"),
        (["pipeline", "run", "training"], "pass --local, or set KFP_HOST"),
        (["history", "ghost"], "no registered model named 'ghost'"),
        (["rollback", "ghost"], "no registered model named 'ghost'"),
        (["promote", "ghost", "1"], "model 'ghost' has no version '1'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, problem, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert problem in err


def test_settings_errors_are_usage_errors(monkeypatch, capsys):
    monkeypatch.setenv("CONTENTML_FEAST_ONLINE_STORE", "memcached")
    assert main(["models", "list", "--json"]) == 2
    assert "CONTENTML_FEAST_ONLINE_STORE must be 'sqlite' or 'redis'" in capsys.readouterr().err


def test_models_list_on_an_empty_registry(capsys):
    assert main(["models", "list", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
