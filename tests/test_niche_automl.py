"""`contentml niche automl`: a global study, warm-started niche studies, registered winners
gated on the validation window (a short budget on the real trending data)."""

from __future__ import annotations

import json

import pytest

from contentml import registry
from contentml.cli import main
from tests.conftest import make_settings
from training.niche.automl import UnknownNiche, run_automl, slug

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return make_settings(tmp_path_factory.mktemp("niche") / "state")


@pytest.fixture(scope="module")
def summary(settings, one_thread) -> dict:
    return run_automl(settings, budget_minutes=0.25, niches=["music"])


def test_summary_compares_each_niche_with_the_global_model(summary: dict):
    assert summary["global"]["model"] == "niche-global" and summary["global"]["trials"] >= 1
    (music,) = summary["niches"]
    assert music["niche"] == "Music" and music["model"] == "niche-music"
    assert music["best_family"] in {"ridge", "gbm", "forest", "mlp"}
    assert music["trials"] >= 1 and music["validation_rows"] >= 30
    assert music["validation_rmse"] > 0 and music["global_rmse"] > 0
    table = {row["slug"]: row for row in summary["niches_table"]}
    assert table["music"]["enough_data"] and not table["shows"]["enough_data"]
    json.dumps(summary)  # the CLI prints it as one JSON line


def test_winners_are_registered_and_the_first_becomes_champion(summary: dict, settings):
    client = registry.connect(settings)
    for name in ("niche-global", "niche-music"):
        assert registry.alias_version(client, name, registry.Alias.CHALLENGER) == "1"
        assert registry.alias_version(client, name, registry.Alias.CHAMPION) == "1"


def test_a_second_run_resumes_the_studies_and_gates_against_the_champion(summary, settings):
    again = run_automl(settings, budget_minutes=0.25, niches=["Music"])
    (music,) = again["niches"]
    assert music["version"] == "2"
    assert music["trials"] > summary["niches"][0]["trials"]  # the study resumed
    client = registry.connect(settings)
    champion = registry.alias_version(client, "niche-music", registry.Alias.CHAMPION)
    assert champion == ("2" if music["promoted"] else "1")


def test_an_unknown_niche_is_named(settings):
    with pytest.raises(UnknownNiche, match="no niche with enough data named \\['shows'\\]"):
        run_automl(settings, budget_minutes=0.1, niches=["shows"])


@pytest.mark.parametrize("minutes", ["0", "-1", "many", "2000"])
def test_a_bad_budget_exits_2(minutes, capsys):
    assert main(["niche", "automl", "--budget-minutes", minutes]) == 2
    assert "--budget-minutes" in capsys.readouterr().err


def test_slug():
    assert slug("Howto & Style") == "howto-style"
    assert slug("News & Politics") == "news-politics"
