"""Feature-store tests: the real Feast flow on a small slice of the real data.

Three M4 series and three days of trending snapshots keep the whole module to seconds while
exercising the real file offline store, SQLite online store and (when it runs) Redis.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
from feast import FeatureStore

from contentml.features import (
    NEW_CHANNEL_HISTORY,
    RECENT_HOURS,
    TRAINING_COLUMNS,
    TRAINING_DTYPES,
    apply_definitions,
    channel_history_frame,
    channel_stats_frame,
    engagement_training_frame,
    feature_store,
    materialize,
    niche_stats_frame,
    online_channel_history,
    online_history,
    publish_engagement_features,
    repo_config,
    trend_training_frame,
    video_stats_frame,
    write_sources,
)
from contentml.settings import Settings
from feature_repo.niche_schema import CHANNEL_HISTORY
from tests.conftest import DATA_DIR, make_settings, requires_postgres, requires_redis
from tests.helpers.features import feature_step
from training.data import SERIES_END, load_m4_hourly, load_youtube_trending
from training.niche.data import engagement_frame, engagement_rows

M4_PATH = DATA_DIR / "m4-hourly" / "Hourly-train.csv"
SERIES_IDS = ["H1", "H2", "H3"]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
HOUR = pd.Timedelta(hours=1)


def _settings(root: Path, **env: str) -> Settings:
    # The offline data lives outside the home on purpose: sources must follow feast_data_dir.
    return make_settings(root / "home", CONTENTML_FEAST_DATA_DIR=str(root / "offline"), **env)


@pytest.fixture(scope="module")
def series() -> pd.DataFrame:
    return load_m4_hourly(M4_PATH, limit=len(SERIES_IDS))


@pytest.fixture(scope="module")
def videos() -> pd.DataFrame:
    youtube = load_youtube_trending(DATA_DIR)
    first_days = sorted(youtube["event_timestamp"].unique())[:3]
    return youtube[youtube["event_timestamp"].isin(first_days)].reset_index(drop=True)


@pytest.fixture(scope="module")
def local(
    tmp_path_factory: pytest.TempPathFactory, series: pd.DataFrame, videos: pd.DataFrame
) -> Iterator[tuple[Settings, FeatureStore]]:
    settings = _settings(tmp_path_factory.mktemp("feast"))
    store = feature_step(settings, series, videos)
    yield settings, store
    store.teardown()


@pytest.fixture(scope="module")
def training(local: tuple[Settings, FeatureStore], series: pd.DataFrame) -> pd.DataFrame:
    _, store = local
    start = series["event_timestamp"].min() - 2 * HOUR
    return trend_training_frame(store, SERIES_IDS, start, SERIES_END)


# --- sources and registry -----------------------------------------------------------------


def test_sources_are_written_under_feast_data_dir(local: tuple[Settings, FeatureStore]) -> None:
    settings, store = local
    for source in store.list_data_sources():
        # The registry keeps the relative path; the files sit under this process's data dir.
        assert not Path(source.path).is_absolute()
        assert (settings.feast_data_dir / source.path).is_file()
    assert not list(settings.home.rglob("*.parquet"))


def test_apply_registers_every_definition(local: tuple[Settings, FeatureStore]) -> None:
    _, store = local
    assert {e.name for e in store.list_entities()} == {
        "topic",
        "video",
        "channel",
        "country",
        "niche",
    }
    assert {v.name for v in store.list_feature_views()} == {
        "topic_interest_fv",
        "topic_recent_fv",
        "video_stats_fv",
        "channel_stats_fv",
        "niche_stats_fv",
        "channel_history_fv",
    }
    assert {s.name for s in store.list_feature_services()} == {
        "trend_training_v1",
        "trend_serving_v1",
        "niche_engagement_v1",
    }


def test_repo_config_for_cluster_settings(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        CONTENTML_FEAST_REGISTRY="postgresql://feast:secret@db:5432/feast",
        CONTENTML_FEAST_ONLINE_STORE="redis",
        CONTENTML_FEAST_REDIS_URL="redis:6379,db=2",
    )
    config = repo_config(settings)
    assert config.registry.registry_type == "sql"
    assert config.registry.path == "postgresql+psycopg://feast:secret@db:5432/feast"
    assert config.online_store.type == "redis"
    assert config.online_store.connection_string == "redis:6379,db=2"
    assert config.repo_path == settings.feast_data_dir


# --- offline: point-in-time correct training rows -----------------------------------------


def test_training_frame_has_every_requested_hour(
    training: pd.DataFrame, series: pd.DataFrame
) -> None:
    assert list(training.columns) == TRAINING_COLUMNS
    assert training.dtypes.astype(str).to_dict() == TRAINING_DTYPES
    hours = pd.date_range(series["event_timestamp"].min() - 2 * HOUR, SERIES_END, freq="h")
    assert len(training) == len(SERIES_IDS) * len(hours)
    assert training.equals(training.sort_values(["series_id", "event_timestamp"]))
    # Hours without an observation (before a series starts, SERIES_END itself) stay empty.
    observed = training.merge(series, on=["series_id", "event_timestamp"], how="left")
    missing = observed["interest_y"].isna()
    assert training.loc[missing.to_numpy(), TRAINING_COLUMNS[2:]].isna().all().all()
    np.testing.assert_array_equal(
        observed.loc[~missing, "interest_x"], observed["interest_y"].dropna()
    )


def test_training_means_use_only_the_past(training: pd.DataFrame, series: pd.DataFrame) -> None:
    for series_id, raw in series.groupby("series_id"):
        values = raw["interest"].to_numpy()
        rows = training[(training["series_id"] == series_id) & training["interest"].notna()]
        assert len(rows) == len(values)
        for window in (24, 168):
            expected = [values[max(0, i - window + 1) : i + 1].mean() for i in range(len(values))]
            got = rows[f"interest_mean_{window}h"].to_numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=f"{series_id} {window}h")


def test_training_rows_never_see_the_future(
    tmp_path: Path,
    training: pd.DataFrame,
    series: pd.DataFrame,
    videos: pd.DataFrame,
) -> None:
    # Poison every value after a cutoff: rows up to the cutoff must not change at all.
    cutoff = SERIES_END - 100 * HOUR
    poisoned = series.copy()
    future = poisoned["event_timestamp"] > cutoff
    poisoned.loc[future, "interest"] = 1e9
    store = feature_step(_settings(tmp_path), poisoned, videos)
    start = series["event_timestamp"].min() - 2 * HOUR
    again = trend_training_frame(store, SERIES_IDS, start, SERIES_END)

    past = training["event_timestamp"] <= cutoff
    pd.testing.assert_frame_equal(again[past], training[past])
    later = again.loc[~past, "interest_mean_168h"].dropna()
    assert (later > 1e6).all()


# --- online: what the model server reads --------------------------------------------------


def _expected_history(series: pd.DataFrame, series_id: str) -> list[float]:
    return series.loc[series["series_id"] == series_id, "interest"].tail(RECENT_HOURS).tolist()


def test_online_history_is_the_last_week(
    local: tuple[Settings, FeatureStore], series: pd.DataFrame
) -> None:
    _, store = local
    history = online_history(store, [*SERIES_IDS, "H999"])
    for series_id in SERIES_IDS:
        assert history[series_id] == _expected_history(series, series_id)
        assert len(history[series_id]) == RECENT_HOURS
    assert history["H999"] is None


def test_trending_features_are_online(
    local: tuple[Settings, FeatureStore], videos: pd.DataFrame
) -> None:
    _, store = local
    last_day = videos["event_timestamp"].max()
    on_every_day = videos.groupby("video_id")["event_timestamp"].nunique()
    video_id = on_every_day[on_every_day == 3].index[0]
    row = videos[(videos["video_id"] == video_id) & (videos["event_timestamp"] == last_day)]
    category_id = int(row["category_id"].iloc[0])
    response = store.get_online_features(
        features=[
            "video_stats_fv:views",
            "video_stats_fv:days_on_trending",
            "channel_stats_fv:videos_trending",
            "niche_stats_fv:category",
        ],
        entity_rows=[
            {
                "video_id": video_id,
                "channel_id": row["channel_id"].iloc[0],
                "category_id": category_id,
            }
        ],
    ).to_dict()
    assert response["views"] == [row["views"].max()]
    assert response["days_on_trending"] == [3]
    assert response["videos_trending"][0] >= 1
    assert response["category"] == [row["category"].iloc[0]]


def test_second_run_changes_nothing(
    local: tuple[Settings, FeatureStore],
    training: pd.DataFrame,
    series: pd.DataFrame,
    videos: pd.DataFrame,
) -> None:
    settings, _ = local
    store = feature_step(settings, series, videos)
    assert online_history(store, ["H1"])["H1"] == _expected_history(series, "H1")
    start = series["event_timestamp"].min() - 2 * HOUR
    pd.testing.assert_frame_equal(
        trend_training_frame(store, SERIES_IDS, start, SERIES_END), training
    )
    assert len(store.list_feature_views()) == 6


# --- the niche models' channel history ---------------------------------------------------


def test_engagement_features_from_feast_are_the_in_memory_join(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    # All 40 days: the point-in-time join must pick each row's own day among many.
    videos = load_youtube_trending(DATA_DIR)
    store = publish_engagement_features(_settings(tmp_path), videos)
    assert capfd.readouterr().out == ""  # the CLI's stdout is its JSON answer
    joined = engagement_training_frame(store, engagement_rows(videos))
    pd.testing.assert_frame_equal(joined, engagement_frame(videos))

    history = channel_history_frame(videos)
    latest = history[history["event_timestamp"] == history["event_timestamp"].max()].iloc[:3]
    keys = pd.concat(
        [
            latest[["channel_id", "country"]],
            pd.DataFrame([{"channel_id": "ch_x", "country": "US"}]),
        ],
        ignore_index=True,
    )
    online = online_channel_history(store, keys)
    expected = [*latest[list(CHANNEL_HISTORY)].to_dict(orient="records"), NEW_CHANNEL_HISTORY]
    assert online.to_dict(orient="records") == expected


def test_the_join_refuses_rows_whose_history_was_never_published(
    local: tuple[Settings, FeatureStore], videos: pd.DataFrame
) -> None:
    _, store = local  # published only the first three days
    later = load_youtube_trending(DATA_DIR)
    later = later[later["event_timestamp"] > videos["event_timestamp"].max()]
    with pytest.raises(ValueError, match="publish the features of the same data first"):
        engagement_training_frame(store, engagement_rows(later))


# --- feature frames: the trending aggregates ----------------------------------------------


def test_trending_frames_merge_countries_and_count_days() -> None:
    day = pd.Timestamp("2017-09-13", tz="UTC")
    videos = pd.DataFrame(
        {
            "video_id": ["a", "a", "a", "b"],
            "channel_id": ["ch_1", "ch_1", "ch_1", "ch_1"],
            "category_id": [24, 24, 24, 24],
            "category": ["Entertainment"] * 4,
            "country": ["US", "GB", "US", "GB"],
            "views": [100, 120, 300, 0],
            "likes": [10, 12, 30, 0],
            "dislikes": [1, 1, 2, 0],
            "comment_total": [5, 5, 9, 0],
            "event_timestamp": [day, day, day + pd.Timedelta(days=1), day],
        }
    )
    stats = video_stats_frame(videos).set_index(["video_id", "event_timestamp"])
    assert len(stats) == 3
    assert stats.loc[("a", day), "views"] == 120
    assert stats.loc[("a", day + pd.Timedelta(days=1)), "days_on_trending"] == 2
    assert stats.loc[("a", day), "like_rate"] == pytest.approx(0.1)
    assert stats.loc[("b", day), "like_rate"] == 0.0

    channels = channel_stats_frame(videos).set_index("event_timestamp")
    assert channels.loc[day, "videos_trending"] == 2
    assert channels.loc[day, "total_views"] == 120
    niches = niche_stats_frame(videos).set_index("event_timestamp")
    assert niches.loc[day, "channels_trending"] == 1
    assert niches.loc[day, "category"] == "Entertainment"


# --- the same flow against the real Redis -------------------------------------------------


@pytest.fixture()
def redis_store(
    tmp_path: Path, series: pd.DataFrame, videos: pd.DataFrame, postgres_url: str
) -> Iterator[tuple[Settings, FeatureStore]]:
    """The cluster configuration: registry in PostgreSQL, online store in Redis."""
    # A project per test: Redis keys end with the project name, so tests cannot collide.
    settings = _settings(
        tmp_path,
        CONTENTML_FEAST_REGISTRY=postgres_url,
        CONTENTML_FEAST_ONLINE_STORE="redis",
        CONTENTML_FEAST_REDIS_URL=f"{REDIS_HOST}:{REDIS_PORT}",
        CONTENTML_FEAST_PROJECT=f"test_{uuid.uuid4().hex[:12]}",
    )
    store = feature_store(settings)
    try:
        write_sources(settings, series, videos)
        apply_definitions(store)
        materialize(store, series["event_timestamp"].max())
        yield settings, store
    finally:
        # Deletes this project's keys, also when the test failed half-way.
        store.teardown()


def _redis_keys(project: str) -> list[bytes]:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        return list(client.scan_iter(match=b"*" + project.encode()))
    finally:
        client.close()


@pytest.mark.redis
@requires_redis
@requires_postgres
def test_online_history_from_redis(
    redis_store: tuple[Settings, FeatureStore], series: pd.DataFrame
) -> None:
    settings, store = redis_store
    assert _redis_keys(settings.feast_project)
    history = online_history(store, [*SERIES_IDS, "H999"])
    for series_id in SERIES_IDS:
        assert history[series_id] == _expected_history(series, series_id)
    assert history["H999"] is None

    # A second run writes the same keys again instead of failing or duplicating.
    materialize(store, SERIES_END)
    assert online_history(store, ["H1"])["H1"] == _expected_history(series, "H1")

    store.teardown()
    assert _redis_keys(settings.feast_project) == []


def test_feast_imports_without_typeguards_recompilation_or_torch() -> None:
    """A fresh process: Feast's definition classes are plain (not re-compiled by typeguard at
    import), typeguard's decorator is its own again afterwards, torch is not imported, and
    importing it later works."""
    probe = (
        "import sys, typeguard, contentml.features, feast.feature_view as fv; "
        "print(typeguard.typechecked is typeguard._decorators.typechecked, "
        "'TypeCheckMemo' in fv.FeatureView.__init__.__code__.co_names, 'torch' in sys.modules); "
        "import torch; print(int(torch.ones(2).sum()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["True", "False", "False", "2"]
