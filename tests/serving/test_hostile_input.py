"""Hostile names and artifact locations: each is refused with an error naming the problem
(`UserError`; exit status 2 from the CLI) before anything is read or written, and the registry
and the artifact store are left as they were. A version whose artifacts lie outside the
registry's own store is never loaded: not by promote, not by the model server, not by deploy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from contentml import names, registry
from contentml.registry import Alias, RegistryError
from contentml.settings import Settings
from entrypoints import deploy
from serving.model_server.versions import VersionedModel
from tests.conftest import make_settings
from tests.helpers.registry import cli, register_versions

HOSTILE_NAMES = [
    ("..", "'..'"),
    ("../../etc/passwd", "'..'"),
    ("/etc/passwd", "'/'"),
    ("trend/../../x", "'..'"),
    ("%2e%2e%2fetc", "'%'"),
    ("..%2f..%2fetc", "'..'"),
    ("%2E%2E%5C", "'%'"),
    ("..\\..\\windows", "'..'"),
    ("a\\b", "backslash"),
    ("trend\x00.txt", "NUL"),
    ("t" * 129, "longer than 128"),
    ("", "empty"),
    (" trend", "letters, digits"),
    ("trend\n", "letters, digits"),
    ("tr'end", "letters, digits"),
    ("tr\u0435nd", "letters, digits"),  # a Cyrillic e
    ("~root", "letters, digits"),
    (".hidden", "letters, digits"),
]
HOSTILE_VERSIONS = [
    *("0", "-1", "01", "1.0", "1/../2", "%31", "2147483648", "", "1\x00", " 1"),
    "9" * 5_000,  # more digits than Python converts to an int
]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Settings:
    """A registry with one model, `toy`, at champion v1 (every test checks that it changed
    nothing it was not meant to)."""
    settings = make_settings(tmp_path_factory.mktemp("hostile") / "state")
    register_versions(settings, "toy", 1)
    registry.promote(registry.connect(settings), "toy", "1")
    return settings


def snapshot(settings: Settings) -> tuple:
    """What a refused request must not change: every file under the state folder (the MLflow
    database's content is compared through MLflow) and the registry's models, versions,
    tags, aliases and experiments."""
    files = sorted(
        (str(path.relative_to(settings.home)), path.stat().st_size, path.stat().st_mtime_ns)
        for path in settings.home.rglob("*")
        if path.is_file() and path.name != "mlflow.db"
    )
    client = registry.connect(settings)
    models = [(m.name, m.tags, m.aliases) for m in client.search_registered_models()]
    versions = [(v.name, v.version, v.source) for v in client.search_model_versions()]
    experiments = [(e.name, e.artifact_location) for e in client.search_experiments()]
    return files, models, versions, experiments


@pytest.mark.parametrize(("name", "problem"), HOSTILE_NAMES)
def test_a_hostile_model_name_is_refused_by_every_command(home, name, problem, monkeypatch, capsys):
    before = snapshot(home)
    for argv in [
        ("promote", name, "1"),
        ("promote", name, "1", "--force", "--reason", "x"),
        ("rollback", name),
        ("history", name, "--json"),
    ]:
        status, out, err = cli(home, monkeypatch, capsys, *argv)
        assert status == 2 and out == "", (argv, err)
        assert err.count("\n") == 1 and "model name" in err and problem in err, (argv, err)
    assert snapshot(home) == before


@pytest.mark.parametrize(("name", "problem"), HOSTILE_NAMES)
def test_a_hostile_model_name_is_refused_by_every_registry_function(home, name, problem):
    client = registry.connect(home)
    before = snapshot(home)
    for call in [
        lambda: registry.model_version(client, name, "1"),
        lambda: registry.alias_version(client, name, Alias.CHAMPION),
        lambda: registry.history(client, name),
        lambda: registry.promote(client, name, "1"),
        lambda: registry.rollback(client, name),
        lambda: registry.set_alias(client, name, Alias.CHALLENGER, "1", action="x", reason="x"),
        lambda: registry.register_challenger(client, name, "1", "x"),
        lambda: registry.stored_artifact_uri(client, name, "1"),
    ]:
        with pytest.raises(names.NameRefused, match=f"model name .* is refused: .*{problem}"):
            call()
    assert snapshot(home) == before


@pytest.mark.parametrize("version", HOSTILE_VERSIONS)
def test_a_hostile_version_is_refused(home, version):
    client = registry.connect(home)
    before = snapshot(home)
    for call in [
        lambda: registry.model_version(client, "toy", version),
        lambda: registry.promote(client, "toy", version, force=True, reason="x"),
        lambda: registry.stored_artifact_uri(client, "toy", version),
    ]:
        with pytest.raises(names.NameRefused, match="model version .* is refused: it must be"):
            call()
    assert snapshot(home) == before


@pytest.mark.parametrize(("name", "problem"), HOSTILE_NAMES)
def test_a_hostile_experiment_name_creates_nothing(home, name, problem):
    settings = make_settings(home.home, CONTENTML_MLFLOW_EXPERIMENT=name)
    before = snapshot(home)
    with pytest.raises(names.NameRefused, match=f"experiment name .* is refused: .*{problem}"):
        registry.experiment_id(registry.connect(settings), settings)
    assert snapshot(home) == before


@pytest.mark.parametrize(
    "path", ["../../../etc", "/etc", "model/../../x", "%2e%2e/x", "model\\..\\x", "a//b", "m\x00"]
)
def test_a_hostile_artifact_path_is_refused(path):
    with pytest.raises(names.NameRefused, match="artifact path .* is refused"):
        names.artifact_path(path)


def test_safe_names_pass_unchanged():
    for name in ["trend", "niche-howto-style", "niche-global", "toy_1.2-a", "t" * 128]:
        assert names.model_name(name) == name
    assert names.version(7) == names.version("7") == "7"
    assert names.artifact_path("artifacts/model") == "artifacts/model"


# --- artifacts outside the registry's store ----------------------------------------------


def outside_sources(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """Sources a version can be registered with that point out of the artifact root."""
    root = Path(settings.mlflow_artifact_root)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = root / "link-out"  # a link inside the root to a folder outside it
    link.symlink_to(outside, target_is_directory=True)
    return {
        "system folder": "file:///etc",
        "plain path": "/etc",
        "sibling with the root as prefix": f"{root}-evil/model",
        "dot-dot": f"file://{root}/../outside",
        "url-encoded dot-dot": f"file://{root}/%2e%2e/%2e%2e/outside",
        "symlink": str(link),
        "another bucket": "s3://another-bucket/artifacts/model",
        "another server's proxy": "mlflow-artifacts://evil.example:5000/0/model",
    }


def register_outside(settings: Settings, name: str, source: str) -> str:
    """A version whose source was set through MLflow directly, as anyone with write access
    to the registry could."""
    client = registry.connect(settings)
    run = client.create_run(registry.experiment_id(client, settings))
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, source, run.info.run_id).version)


@dataclass(frozen=True)
class Recorded:
    version: str


class RecordingModel(VersionedModel[Recorded]):
    """A predictor that only records which versions it was asked to load."""

    def __init__(self, name: str, settings: Settings):
        super().__init__(name, settings)
        self.loaded: list[str] = []

    def load_version(self, version: str) -> Recorded:
        self.loaded.append(version)
        return Recorded(version)


def test_versions_outside_the_store_are_never_loaded(home, tmp_path):
    client = registry.connect(home)
    for case, source in outside_sources(home, tmp_path).items():
        version = register_outside(home, "toy", source)
        with pytest.raises(RegistryError, match="outside the registry's artifact store"):
            registry.stored_artifact_uri(client, "toy", version)
        for force in (False, True):
            with pytest.raises(RegistryError, match="outside the registry's artifact store"):
                registry.promote(client, "toy", version, reason="x", force=force)
        gate = registry.promotion_gate(
            client,
            "toy",
            version,
            metric="m",
            greater_is_better=True,
            challenger_score=1.0,
            score_champion=pytest.fail,
        )
        assert not gate.promoted and "outside the registry's artifact store" in gate.reason, case
        assert registry.alias_version(client, "toy", Alias.CHAMPION) == "1", case

        # Moved behind the platform's back: the server keeps serving v1, never loads it.
        model = RecordingModel("toy", home)
        assert model.load() and model.loaded == ["1"]
        client.set_registered_model_alias("toy", "champion", version)
        assert model.refresh(client) is False and model.version == "1", case
        assert model.loaded == ["1"], case
        with pytest.raises(RegistryError, match="outside the registry's artifact store"):
            RecordingModel("toy", home).load()
        client.set_registered_model_alias("toy", "champion", "1")


def test_the_store_is_the_configured_root(home):
    """A bucket root takes only its own prefix, whole path parts, no `..` in any spelling."""
    client = registry.RegistryClient(
        make_settings(home.home, CONTENTML_MLFLOW_ARTIFACT_ROOT="s3://models/artifacts")
    )
    inside = "s3://models/artifacts/1/models/m-1/artifacts"
    assert registry._store_problem(client, inside) is None
    for uri in [
        "s3://models/artifacts-evil/1",
        "s3://models/other/1",
        "s3://other/artifacts/1",
        "s3://models/artifacts/../other",
        "s3://models/artifacts/%2e%2e/other",
        "gs://models/artifacts/1",
        "/models/artifacts/1",
    ]:
        assert "outside the registry's artifact store" in registry._store_problem(client, uri)


def test_deploy_hands_kserve_only_the_stores_artifacts(home, tmp_path):
    """The script predictor's `storageUri` is downloaded by KServe: a version outside the
    store, or an MLmodel file whose artifact path leaves the version's folder, is refused."""
    client = registry.connect(home)
    version = register_outside(home, "script", "file:///etc")
    client.set_registered_model_alias("script", "champion", version)
    with pytest.raises(RegistryError, match="outside the registry's artifact store"):
        deploy.releases(home, "script", canary=False)

    folder = Path(home.mlflow_artifact_root) / "hand-made"
    folder.mkdir()
    mlmodel = {"flavors": {"python_function": {"artifacts": {"model": {"path": "../../etc"}}}}}
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    version = register_outside(home, "script", str(folder))
    client.set_registered_model_alias("script", "champion", version)
    with pytest.raises(names.NameRefused, match="artifact path '../../etc' is refused"):
        deploy.releases(home, "script", canary=False)
