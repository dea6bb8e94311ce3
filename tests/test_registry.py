"""Registry helpers and the promote/rollback/history commands against real MLflow backends:
SQLite (embedded) and PostgreSQL (cluster)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from contentml import registry
from contentml.cli import main
from contentml.registry import Alias, RegistryError
from tests.conftest import make_settings, requires_postgres


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[float], params=None) -> list[float]:
        return [1.0 for _ in model_input]


class Untyped(mlflow.pyfunc.PythonModel):
    """No type hints, so the signature is whatever the test logs with it."""

    def predict(self, context, model_input, params=None):
        return [1.0] * len(model_input)


def views_signature(kind: str) -> ModelSignature:
    return ModelSignature(inputs=Schema([ColSpec(kind, "views")]))


def register(settings, name: str, python_model=None, signature=None) -> str:
    client = registry.connect(settings)
    with mlflow.start_run(experiment_id=registry.experiment_id(client, settings)):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model or Constant(),
            signature=signature,
            registered_model_name=name,
            pip_requirements=["mlflow"],  # inferring them runs a child process: seconds each
        )
    return str(info.registered_model_version)


def register_versions(settings, name: str, count: int) -> list[str]:
    return [register(settings, name) for _ in range(count)]


def register_broken(settings, name: str) -> str:
    """A version whose artifacts are there but do not load, as after a botched upload."""
    version = register(settings, name)
    uri = registry.connect(settings).get_model_version_download_uri(name, version)
    (Path(uri.removeprefix("file://")) / "python_model.pkl").write_bytes(b"not a pickle")
    return version


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=requires_postgres)])
def backend_settings(request, tmp_path: Path):
    if request.param == "sqlite":
        return make_settings(tmp_path / "state")
    url = request.getfixturevalue("postgres_url")
    return make_settings(tmp_path / "state", MLFLOW_TRACKING_URI=url)


@pytest.fixture
def model_name(request) -> str:
    """A name of its own per test: the PostgreSQL database is shared by the module's tests."""
    return "toy-" + re.sub(r"\W+", "-", request.node.name).strip("-")


def test_promote_rollback_and_history(backend_settings, model_name):
    name = model_name
    v1, v2, v3 = register_versions(backend_settings, name, 3)
    client = registry.connect(backend_settings)

    for version in (v1, v2, v3):
        registry.promote(client, name, version, reason=f"v{version}")
    assert registry.alias_version(client, name, Alias.CHAMPION) == v3

    # Each rollback goes one champion further back, not back and forth.
    assert (registry.rollback(client, name).to_version) == v2
    assert (registry.rollback(client, name).to_version) == v1
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback(client, name)
    assert registry.alias_version(client, name, Alias.CHAMPION) == v1

    changes = [(e.action, e.from_version, e.to_version) for e in registry.history(client, name)]
    assert changes == [
        ("promote", None, v1),
        ("promote", v1, v2),
        ("promote", v2, v3),
        ("rollback", v3, v2),
        ("rollback", v2, v1),
    ]

    listed = {m["name"]: m for m in registry.list_models(client)}
    assert listed[name]["aliases"] == {"champion": v1}
    assert [v["version"] for v in listed[name]["versions"]] == [v1, v2, v3]


def test_bad_requests_name_the_problem(settings):
    (version,) = register_versions(settings, "toy", 1)
    client = registry.connect(settings)
    with pytest.raises(RegistryError, match="no version '7'"):
        registry.promote(client, "toy", "7")
    with pytest.raises(RegistryError, match="no registered model named 'ghost'"):
        registry.history(client, "ghost")
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback(client, "toy")
    registry.promote(client, "toy", version)
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback(client, "toy")
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.promote(client, "toy", version, reason=" ", force=True)
    assert registry.alias_version(client, "toy", Alias.CHAMPION) == version


@pytest.mark.parametrize(
    ("challenger", "champion", "greater_is_better", "margin", "promoted"),
    [
        (10.0, 12.0, False, 0.0, True),  # lower sMAPE wins
        (12.0, 12.0, False, 0.0, False),  # a tie keeps the champion
        (11.5, 12.0, False, 1.0, False),  # not better by the margin
        (0.9, 0.8, True, 0.0, True),  # higher F1 wins
        (0.7, 0.8, True, 0.0, False),
    ],
)
def test_promotion_gate(settings, challenger, champion, greater_is_better, margin, promoted):
    v1, v2 = register_versions(settings, "toy", 2)
    client = registry.connect(settings)
    first = registry.promotion_gate(
        client,
        "toy",
        v1,
        metric="m",
        greater_is_better=greater_is_better,
        challenger_score=champion,
        score_champion=pytest.fail,
    )
    assert first.promoted and first.champion is None
    scored = []
    decision = registry.promotion_gate(
        client,
        "toy",
        v2,
        metric="m",
        greater_is_better=greater_is_better,
        challenger_score=challenger,
        margin=margin,
        score_champion=lambda uri: scored.append(uri) or champion,
    )
    assert scored == [f"models:/toy/{v1}"]
    assert decision.promoted is promoted
    assert registry.alias_version(client, "toy", Alias.CHAMPION) == (v2 if promoted else v1)


def test_gate_checks_artifacts_and_signature_before_metrics(settings):
    champion = register(settings, "toy", Untyped(), views_signature("double"))
    broken = register_broken(settings, "toy")
    renamed = register(settings, "toy", Untyped(), ModelSignature(Schema([ColSpec("double", "x")])))
    retyped = register(settings, "toy", Untyped(), views_signature("string"))
    client = registry.connect(settings)
    registry.promote(client, "toy", champion)

    def gate(version: str) -> registry.GateDecision:
        return registry.promotion_gate(
            client,
            "toy",
            version,
            metric="m",
            greater_is_better=True,
            challenger_score=1.0,
            score_champion=pytest.fail,  # refused before any scoring
        )

    refused = gate(broken)
    assert not refused.promoted and "artifacts do not load" in refused.reason
    assert "input 'views' is missing, champion's is double" in gate(renamed).reason
    decision = gate(retyped)
    assert not decision.promoted
    assert decision.reason == (
        f"v{retyped}: signature incompatible with champion v{champion}: "
        "input 'views' is string, champion's is double"
    )
    assert registry.alias_version(client, "toy", Alias.CHAMPION) == champion


def test_a_champion_whose_artifacts_are_gone_can_be_replaced(settings):
    lost, good = register_versions(settings, "toy", 2)
    client = registry.connect(settings)
    registry.promote(client, "toy", lost)
    shutil.rmtree(client.get_model_version_download_uri("toy", lost).removeprefix("file://"))
    assert registry.promote(client, "toy", good).from_version == lost


def cli(settings, monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """`contentml ARGV` in this process against `settings`: status, stdout, stderr."""
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_promote_checks_force_and_rollback(backend_settings, model_name, monkeypatch, capsys):
    name = model_name
    unsigned = register(backend_settings, name, Untyped())
    signed = register(backend_settings, name, Untyped(), views_signature("double"))
    retyped = register(backend_settings, name, Untyped(), views_signature("string"))
    broken = register_broken(backend_settings, name)

    def run(*argv: str) -> tuple[int, str, str]:
        return cli(backend_settings, monkeypatch, capsys, *argv)

    assert run("promote", name, unsigned)[0] == 0
    # A champion without a signature promised callers nothing: any signature will do.
    assert run("promote", name, signed, "--reason", "typed")[0] == 0

    status, _, err = run("promote", name, retyped)
    assert status == 2 and err.count("\n") == 1
    assert "signature incompatible with champion" in err and "--force --reason" in err
    status, _, err = run("promote", name, broken)
    assert status == 2 and "artifacts do not load" in err
    status, _, err = run("promote", name, broken, "--force")
    assert status == 2 and "--force needs --reason TEXT" in err
    # Only the champion is checked: an experiment may be anything.
    assert run("promote", name, retyped, "--to", "experimental")[0] == 0

    status, out, _ = run("promote", name, broken, "--force", "--reason", "hotfix, see INC-7")
    assert status == 0
    assert json.loads(out)["action"] == "force-promote"
    status, out, _ = run("rollback", name)
    assert status == 0 and json.loads(out)["to_version"] == signed

    status, out, _ = run("history", name, "--json")
    events = [(e["alias"], e["action"], e["to_version"], e["reason"]) for e in json.loads(out)]
    assert events == [
        ("champion", "promote", unsigned, "manual promotion"),
        ("champion", "promote", signed, "typed"),
        ("experimental", "promote", retyped, "manual promotion"),
        ("champion", "force-promote", broken, "hotfix, see INC-7"),
        ("champion", "rollback", signed, "manual rollback"),
    ]
    status, out, _ = run("history", name)
    assert status == 0 and f"champion: v{broken} -> v{signed} (rollback by " in out

    for argv, problem in [
        (("promote", name, "99"), f"model {name!r} has no version '99'"),
        (("promote", "ghost", "1"), "model 'ghost' has no version '1'"),
        (("rollback", "ghost"), "no registered model named 'ghost'"),
        (("history", "ghost", "--json"), "no registered model named 'ghost'"),
    ]:
        status, _, err = run(*argv)
        assert status == 2 and problem in err and err.count("\n") == 1, (argv, err)
