"""`contentml niche automl`: a global study, warm-started niche studies, registered winners
gated on the validation window (a short budget on the real trending data)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pandas as pd
import pytest

from contentml import features, registry
from contentml.names import niche_slug
from entrypoints.cli import main
from entrypoints.demo import free_port, model_server
from feature_repo.niche_schema import FEATURES
from serving.model_server.niche import (
    TrendingVideo,
    _feature_rows,
    own_features,
    read_channel_histories,
)
from serving.model_server.refresh import HeldLookups
from tests.conftest import DATA_DIR, make_settings
from training.data import load_youtube_trending
from training.niche.automl import (
    TOPIC_CLUSTERS,
    Split,
    UnknownNiche,
    load_split,
    niches_table,
    run_automl,
    save_split,
)
from training.niche.data import engagement_frame

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
    assert table["music"]["kind"] == "category"
    topics = [row for row in summary["niches_table"] if row["kind"] == "topic"]
    assert len(topics) == TOPIC_CLUSTERS and sum(t["enough_data"] for t in topics) >= 5
    assert all(t["slug"].startswith("topic-") for t in topics)
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


def test_niches_table_lists_categories_and_topics_with_their_rows():
    def rows(pairs: list[tuple[str, str, int]]) -> pd.DataFrame:
        return pd.DataFrame(
            [(c, t) for c, t, n in pairs for _ in range(n)], columns=["category", "topic"]
        )

    train = rows([("Music", "topic-song", 150), ("Comedy", "topic-song", 149)])
    validation = rows([("Music", "topic-song", 30), ("Comedy", "topic-joke", 30)])
    table = niches_table(train, validation).set_index("niche")
    assert table.loc["Music"].to_dict() == {
        "kind": "category",
        "slug": "music",
        "train_rows": 150,
        "validation_rows": 30,
        "enough_data": True,
    }
    assert not table.loc["Comedy", "enough_data"]  # 149 training rows
    assert table.loc["topic-song", "train_rows"] == 299 and table.loc["topic-song", "enough_data"]
    assert table.loc["topic-joke", "train_rows"] == 0


def test_slug():
    assert niche_slug("Howto & Style") == "howto-style"
    assert niche_slug("News & Politics") == "news-politics"


@pytest.fixture(scope="module")
def server(summary: dict, settings) -> Iterator[str]:
    with model_server(settings, free_port(), "--workers", "0") as url:
        yield url


def a_real_video(category: str = "Music") -> dict:
    """The request for a real video on its first trending day, the last day of its country's
    data: the online store then holds the channel history training saw for it."""
    videos = load_youtube_trending(DATA_DIR)
    frame = engagement_frame(videos)
    last_day = frame.groupby("country")["event_timestamp"].transform("max")
    row = frame[(frame["event_timestamp"] == last_day) & (frame["category"] == category)]
    row = row.sort_values("channel_prior_videos").iloc[-1]
    snapshot = videos[
        (videos["video_id"] == row["video_id"])
        & (videos["country"] == row["country"])
        & (videos["event_timestamp"] == row["event_timestamp"])
    ].iloc[0]
    return {
        "category": category,
        "channel_id": snapshot["channel_id"],
        "country": snapshot["country"],
        "title": snapshot["title"],
        "tags": snapshot["tags"],
        **{name: int(snapshot[name]) for name in ("views", "likes", "dislikes", "comment_total")},
        "trending_date": row["event_timestamp"].date().isoformat(),
        "expected_features": row[list(FEATURES)].astype(float).to_dict(),
    }


def held_histories(settings) -> HeldLookups:
    """Channel histories as the niche predictor holds them, read from the settings' Feast."""
    store = features.feature_store(settings)
    return HeldLookups(lambda keys: read_channel_histories(store, keys))


def request_of(video: dict) -> dict:
    return {k: v for k, v in video.items() if k != "expected_features"}


def test_served_features_are_the_features_training_saw(summary: dict, settings):
    video = a_real_video()
    assert video["expected_features"]["channel_prior_videos"] > 0  # Feast has a history
    own = HeldLookups(own_features)
    request = TrendingVideo.model_validate(request_of(video))
    (served,) = _feature_rows(held_histories(settings), own, [request])
    assert served == pytest.approx(video["expected_features"])
    assert list(served) == list(FEATURES)
    # Held: a second request of the video reads its own features from memory.
    assert len(own) == 1 and _feature_rows(held_histories(settings), own, [request]) == [served]


def test_the_router_serves_a_known_niche_and_falls_back_for_an_unknown_one(server: str):
    video = request_of(a_real_video())
    instances = [video, {**video, "category": "Nonprofits & Activism"}]
    response = httpx.post(f"{server}/v1/models/niche:predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    known, unknown = response.json()["predictions"]
    assert known["model"] == "niche-music" and known["fallback"] is False
    assert unknown["model"] == "niche-global" and unknown["fallback"] is True
    assert all(np.isfinite(p["log_views_gained"]) for p in (known, unknown))


def test_a_channel_feast_does_not_know_is_served_as_new(server: str, settings):
    """Served with the history training gives a new channel. (Not "a different answer": the
    winner of a 15-second search may be a model that ignores the channel's history.)"""
    video = request_of(a_real_video())
    unknown_channel = {**video, "channel_id": "ch_000000000000"}
    requests = [TrendingVideo.model_validate(v) for v in (video, unknown_channel)]
    known, new = _feature_rows(held_histories(settings), HeldLookups(own_features), requests)
    assert known["channel_is_new"] == 0
    assert new == {**known, **features.NEW_CHANNEL_HISTORY}
    response = httpx.post(
        f"{server}/v1/models/niche:predict", json={"instances": [video, unknown_channel]}
    )
    assert response.status_code == 200, response.text
    assert all(np.isfinite(p["log_views_gained"]) for p in response.json()["predictions"])


def test_each_niche_model_has_its_own_endpoint(server: str):
    response = httpx.post(
        f"{server}/v1/models/niche-music:predict",
        json={"instances": [request_of(a_real_video())]},
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["model_version"] in {"1", "2"}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"category": None}, "category: Field required"),
        ({"category": ""}, "category: String should have at least 1 character"),
        ({"views": "many"}, "views: Input should be a valid integer"),
        ({"likes": -1}, "likes: Input should be greater than or equal to 0"),
        ({"country": "usa"}, "country: String should match pattern"),
        ({"trending_date": "yesterday"}, "trending_date: Input should be a valid date"),
        # Dates pandas' timestamps cannot hold were a 500 (OutOfBoundsDatetime), found by
        # `make fuzz`.
        ({"trending_date": "0005-04-01"}, "trending_date: Input should be greater than or equal"),
        ({"trending_date": "9999-12-31"}, "trending_date: Input should be less than or equal"),
        ({"nope": 1.0}, "nope: Extra inputs are not permitted"),
    ],
)
def test_malformed_niche_requests_get_400_naming_the_field(server: str, change, problem):
    instance = {**request_of(a_real_video()), **change}
    instance = {k: v for k, v in instance.items() if v is not None}
    response = httpx.post(f"{server}/v1/models/niche:predict", json={"instances": [instance]})
    assert response.status_code == 400
    assert problem in response.text


def test_a_saved_split_reads_back_as_it_was(tmp_path):
    """What the global pipeline task hands every niche task."""
    when = pd.to_datetime(["2017-11-14", "2017-11-20"], utc=True)
    split = Split(
        train=pd.DataFrame({"title": ["a", "b"], "event_timestamp": when, "views": [1.0, 2.5]}),
        validation=pd.DataFrame({"title": ["c"], "event_timestamp": when[1:], "views": [0.5]}),
    )
    save_split(split, tmp_path / "split")
    for saved, read in zip(split, load_split(tmp_path / "split"), strict=True):
        pd.testing.assert_frame_equal(read, saved)
