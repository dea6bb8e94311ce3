"""Registry helpers against real MLflow backends: SQLite (embedded) and PostgreSQL (cluster)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from contentml import registry
from contentml.registry import Alias, RegistryError
from tests.conftest import make_settings, requires_postgres


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[float], params=None) -> list[float]:
        return [1.0 for _ in model_input]


def register_versions(settings, name: str, count: int) -> list[str]:
    client = registry.connect(settings)
    versions = []
    for _ in range(count):
        with mlflow.start_run(experiment_id=registry.experiment_id(client, settings)):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=Constant(), registered_model_name=name
            )
        versions.append(str(info.registered_model_version))
    return versions


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=requires_postgres)])
def backend_settings(request, tmp_path: Path):
    if request.param == "sqlite":
        return make_settings(tmp_path / "state")
    url = request.getfixturevalue("postgres_url")
    return make_settings(tmp_path / "state", MLFLOW_TRACKING_URI=url)


def test_promote_rollback_and_history(backend_settings):
    name = "toy"
    v1, v2 = register_versions(backend_settings, name, 2)
    client = registry.connect(backend_settings)

    registry.promote(client, name, v1, reason="first")
    registry.promote(client, name, v2, reason="better")
    assert registry.alias_version(client, name, Alias.CHAMPION) == v2

    event = registry.rollback(client, name)
    assert (event.from_version, event.to_version) == (v2, v1)
    assert registry.alias_version(client, name, Alias.CHAMPION) == v1

    changes = [(e.action, e.from_version, e.to_version) for e in registry.history(client, name)]
    assert changes == [("promote", None, v1), ("promote", v1, v2), ("rollback", v2, v1)]

    listed = {m["name"]: m for m in registry.list_models(client)}
    assert listed[name]["aliases"] == {"champion": v1}
    assert [v["version"] for v in listed[name]["versions"]] == [v1, v2]


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
