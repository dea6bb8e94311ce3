"""`contentml niche automl`: a global study, warm-started niche studies, registered winners
gated on the validation window (a short budget on the real trending data)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from contentml import registry
from contentml.cli import main
from contentml.demo import free_port, model_server
from tests.conftest import DATA_DIR, make_settings
from training.data import load_youtube_trending
from training.niche.automl import UnknownNiche, run_automl, slug
from training.niche.data import FEATURES, engagement_frame

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


@pytest.fixture(scope="module")
def server(summary: dict, settings) -> Iterator[str]:
    with model_server(settings, free_port()) as url:
        yield url


def features_of_a_real_video() -> dict[str, float]:
    frame = engagement_frame(load_youtube_trending(DATA_DIR))
    return {name: float(frame.iloc[0][name]) for name in FEATURES}


def test_the_router_serves_a_known_niche_and_falls_back_for_an_unknown_one(server: str):
    features = features_of_a_real_video()
    instances = [
        {"category": "Music", "features": features},
        {"category": "Nonprofits & Activism", "features": features},
    ]
    response = httpx.post(f"{server}/v1/models/niche:predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    known, unknown = response.json()["predictions"]
    assert known["model"] == "niche-music" and known["fallback"] is False
    assert unknown["model"] == "niche-global" and unknown["fallback"] is True
    assert all(np.isfinite(p["log_views_gained"]) for p in (known, unknown))


def test_each_niche_model_has_its_own_endpoint(server: str):
    response = httpx.post(
        f"{server}/v1/models/niche-music:predict",
        json={"instances": [features_of_a_real_video()]},
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["model_version"] in {"1", "2"}


@pytest.mark.parametrize(
    ("instance", "problem"),
    [
        ({"features": {}}, "category: Field required"),
        ({"category": "", "features": {}}, "category: String should have at least 1 character"),
        ({"category": "Music", "features": {"title_chars": "long"}}, "features.title_chars"),
        ({"category": "Music", "features": {"nope": 1.0}}, "features.nope"),
    ],
)
def test_malformed_niche_requests_get_400_naming_the_field(server: str, instance, problem):
    response = httpx.post(f"{server}/v1/models/niche:predict", json={"instances": [instance]})
    assert response.status_code == 400
    assert problem in response.text
