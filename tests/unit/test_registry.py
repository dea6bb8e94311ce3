"""Registry helpers and the promote/rollback/history commands against real MLflow backends:
SQLite (embedded) and PostgreSQL (cluster), including commands killed (SIGKILL) at each of
their writes."""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from contentml import names, registry
from contentml.registry import Alias, AliasEvent, RegistryError
from contentml.settings import Settings
from entrypoints.cli import main
from tests.conftest import make_settings, requires_postgres
from tests.helpers.registry import (
    children,
    cli,
    register,
    register_versions,
    shared_backend,
)


class Untyped(mlflow.pyfunc.PythonModel):
    """No type hints, so the signature is whatever the test logs with it."""

    def predict(self, context, model_input, params=None):
        return [1.0] * len(model_input)


def views_signature(kind: str) -> ModelSignature:
    return ModelSignature(inputs=Schema([ColSpec(kind, "views")]))


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
    return shared_backend(request, tmp_path, request.getfixturevalue("postgres_url"))


@pytest.fixture
def model_name(request) -> str:
    """A name of its own per test: the PostgreSQL database is shared by the module's tests."""
    return "toy-" + re.sub(r"\W+", "-", request.node.name).strip("-")


def test_a_home_without_a_registry_gets_one_at_first_use(tmp_path: Path):
    """Not through `make_settings`, whose homes start from a copy of an empty registry."""
    home = tmp_path / "new"
    settings = Settings.from_env({"CONTENTML_HOME": str(home)})
    client = registry.connect(settings)
    experiment = client.get_experiment(registry.experiment_id(client, settings))
    assert (home / "mlflow.db").is_file()
    assert experiment.artifact_location == settings.mlflow_artifact_root
    version = register(settings, "toy-first")
    registry.promote(client, "toy-first", version, reason="first")
    assert registry.alias_version(client, "toy-first", Alias.CHAMPION) == version


def test_read_aliases_reads_every_model_page_by_page(backend_settings, model_name, monkeypatch):
    """The model server's one read per poll: every model's aliases, across pages."""
    monkeypatch.setattr(registry, "SEARCH_PAGE", 2)
    client = registry.connect(backend_settings)
    names = [f"{model_name}-{i}" for i in range(3)]
    for name in names:
        register(backend_settings, name)
    registry.promote(client, names[0], "1", reason="first")
    registry.register_challenger(client, names[1], "1", reason="a challenger only")

    aliases = registry.read_aliases(client)

    assert aliases.models(model_name) == names
    assert aliases.version(names[0], Alias.CHAMPION) == "1"
    assert aliases.version(names[1], Alias.CHAMPION) is None
    assert aliases.version(names[1], Alias.CHALLENGER) == "1"
    assert aliases.versions[names[2]] == {}
    assert aliases.version(f"{model_name}-unregistered", Alias.CHAMPION) is None


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


def test_a_rollback_from_a_version_happens_once(backend_settings, model_name):
    name = model_name
    v1, v2, v3 = register_versions(backend_settings, name, 3)
    client = registry.connect(backend_settings)
    for version in (v1, v2, v3):
        registry.promote(client, name, version)

    done = registry.rollback(client, name, from_version=v3)
    assert (done.action, done.from_version, done.to_version) == ("rollback", v3, v2)
    before = registry.history(client, name)
    # Run again (a retry after a timeout, a re-run after a crash): nothing more happens.
    with pytest.raises(registry.AlreadyRolledBack, match=f"already rolled back from v{v3} to") as e:
        registry.rollback(client, name, from_version=v3)
    assert e.value.event == done
    assert registry.history(client, name) == before
    assert registry.alias_version(client, name, Alias.CHAMPION) == v2

    # A champion that no rollback moved away from the version named: a person should look.
    with pytest.raises(RegistryError, match=f"champion is v{v2}, and no rollback moved it from"):
        registry.rollback(client, name, from_version=v1)
    with pytest.raises(names.NameRefused, match="model version '0' is refused"):
        registry.rollback(client, name, from_version="0")
    assert registry.history(client, name) == before

    # The champion named is the champion: an ordinary rollback.
    assert registry.rollback(client, name, from_version=v2).to_version == v1


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

    # `--from`: the same rollback run again does nothing and says so; a champion moved some
    # other way is refused.
    assert run("promote", name, broken, "--force", "--reason", "again")[0] == 0
    status, out, _ = run("rollback", name, "--from", broken)
    rolled = json.loads(out)
    assert status == 0 and (rolled["from_version"], rolled["to_version"]) == (broken, signed)
    status, out, err = run("rollback", name, "--from", broken)
    assert status == 0 and json.loads(out) == rolled
    assert "nothing to do" in err and f"already rolled back from v{broken}" in err
    status, _, err = run("rollback", name, "--from", unsigned)
    assert status == 2 and err.count("\n") == 1
    assert f"champion is v{signed}, and no rollback moved it from v{unsigned}" in err
    assert registry.alias_version(registry.connect(backend_settings), name, Alias.CHAMPION) == (
        signed
    )

    for argv, problem in [
        (("promote", name, "99"), f"model {name!r} has no version '99'"),
        (("promote", "ghost", "1"), "model 'ghost' has no version '1'"),
        (("rollback", "ghost"), "no registered model named 'ghost'"),
        (("rollback", name, "--from", "0"), "--from: must be at least 1, not 0"),
        (("history", "ghost", "--json"), "no registered model named 'ghost'"),
    ]:
        status, _, err = run(*argv)
        assert status == 2 and problem in err and err.count("\n") == 1, (argv, err)


# --- killed at every write ----------------------------------------------------------------

WRITE_PREFIXES = ("create_", "set_", "delete_", "log_", "update_", "finalize_", "_create_model")
"""`MlflowClient` methods that write (`_create_model_version` is how `log_model` registers)."""


def killed_after_write(kill_at: int, job: Callable[[], object]) -> None:
    """Run `job` in this (child) process, which SIGKILLs itself right after its `kill_at`-th
    write to MLflow (0: never). Nothing else is changed."""
    writes = 0

    def counted(method: Callable) -> Callable:
        @functools.wraps(method)
        def write(*args, **kwargs):
            nonlocal writes
            result = method(*args, **kwargs)
            writes += 1
            if writes == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return write

    for attribute in dir(MlflowClient):
        if attribute.startswith(WRITE_PREFIXES):
            setattr(MlflowClient, attribute, counted(getattr(MlflowClient, attribute)))
    job()


def cli_child(settings: Settings, argv: tuple[str, ...], kill_at: int) -> None:
    """`contentml ARGV` in a child process, killed after its `kill_at`-th write."""
    os.environ.update(settings.to_env())
    killed_after_write(kill_at, lambda: sys.exit(main(list(argv))))


def registration_child(settings: Settings, name: str, kill_at: int) -> None:
    """What training does (`training.register.register`): log and register a model, then make it
    the challenger; killed after its `kill_at`-th write."""

    def job() -> None:
        version = register(settings, name)
        registry.register_challenger(registry.connect(settings), name, version, "trained")

    killed_after_write(kill_at, job)


def run_child(target: Callable, *args) -> int | None:
    """`target(*args)` in a child process; its exit status (-9: killed by SIGKILL)."""
    process = children(__name__).Process(target=target, args=args)
    process.start()
    process.join(timeout=300)
    return process.exitcode


def assert_consistent(client: MlflowClient, name: str) -> list[AliasEvent]:
    """Each alias points at a READY version, where the newest recorded change of it says, and
    each record starts where the one before it ended. Returns the history."""
    model = client.get_registered_model(name)
    events = registry.history(client, name)
    for alias in Alias:
        recorded = [e for e in events if e.alias == alias.value]
        current = model.aliases.get(alias.value)
        if current is None:
            assert not recorded, alias
            continue
        assert client.get_model_version(name, str(current)).status == "READY"
        assert recorded[-1].to_version == str(current), (alias, recorded)
        assert [e.from_version for e in recorded] == [None] + [e.to_version for e in recorded[:-1]]
    return events


def changes_since(events: list[AliasEvent], before: list[AliasEvent]) -> list[tuple]:
    assert events[: len(before)] == before  # nothing recorded earlier was lost or changed
    return [(e.action, e.from_version, e.to_version) for e in events[len(before) :]]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["promote", "rollback", "rollback --from"])
def test_a_change_killed_at_any_write_is_consistent_and_a_rerun_finishes_it(
    backend_settings, model_name, command
):
    name = model_name
    versions = register_versions(backend_settings, name, 2)
    client = registry.connect(backend_settings)
    registry.promote(client, name, versions[0])
    for kill_at in itertools.count(1):
        champion = registry.alias_version(client, name, Alias.CHAMPION)
        other = versions[1] if champion == versions[0] else versions[0]
        if command == "promote":
            argv, expected = ("promote", name, other), ("promote", champion, other)
        else:
            registry.promote(client, name, other)  # a champion to roll back from
            argv, expected = ("rollback", name), ("rollback", other, champion)
            if command == "rollback --from":
                argv += ("--from", other)
        before = registry.history(client, name)
        status = run_child(cli_child, backend_settings, argv, kill_at)
        events = assert_consistent(client, name)
        if status == 0:  # it wrote fewer than `kill_at` times: the uninterrupted run
            assert changes_since(events, before) == [expected]
            break
        assert status == -signal.SIGKILL, status
        moved = registry.alias_version(client, name, Alias.CHAMPION) == expected[2]
        # The history holds what happened: the change once the alias moved, else nothing.
        assert changes_since(events, before) == ([expected] if moved else [])
        if moved and command == "rollback":
            continue  # done; running it again would roll back one champion further
        # Running it again finishes it, even when that run is killed too (mid-settling); with
        # `--from`, a rollback whose alias moved is finished, not repeated.
        for rerun_kill_at in (1, 0):
            status = run_child(cli_child, backend_settings, argv, rerun_kill_at)
            assert status in (0, -signal.SIGKILL)
            assert_consistent(client, name)
        assert status == 0
        assert changes_since(assert_consistent(client, name), before) == [expected]
    # The record (pending), the alias (the commit point), the record (done): three writes.
    assert kill_at == 4
    tags = client.get_registered_model(name).tags
    assert not [k for k, v in tags.items() if registry.PENDING in json.loads(v)]


@pytest.mark.slow
def test_a_registration_killed_at_any_write_leaves_ready_versions_and_a_rerun_finishes_it(
    backend_settings, model_name
):
    name = model_name
    client = registry.connect(backend_settings)
    for kill_at in itertools.count(1):
        status = run_child(registration_child, backend_settings, name, kill_at)
        if status == 0:
            break
        assert status == -signal.SIGKILL, status
        if not client.search_registered_models(f"name = '{name}'"):
            continue  # killed before the registered model was created
        assert_consistent(client, name)
        found = client.search_model_versions(f"name = '{name}'")
        assert {v.status for v in found} <= {"READY"}
        newest = max((int(v.version) for v in found), default=None)
        if newest is not None:
            # Registered only once its artifacts were all written: it loads.
            mlflow.pyfunc.load_model(registry.stored_artifact_uri(client, name, str(newest)))
    assert kill_at > 5  # the run, the logged model, its artifacts, the version, the alias
    # Every run after a kill started over; the one that finished made its version challenger.
    newest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    assert registry.alias_version(client, name, Alias.CHALLENGER) == str(newest)
    assert assert_consistent(client, name)[-1].action == "register"
