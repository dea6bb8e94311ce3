"""A trend request by series id reads the series' history from memory, not from Feast's
online store, and still sees newly materialized data within the poll interval. Real Feast
(SQLite online store), real M4 series; no champion needed: the history is the model input and
the cache key, so what the predictor reads here is what it answers from."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from feast import FeatureStore

from contentml import features
from contentml.settings import Settings
from feature_repo.data_sources import topic_recent_source
from feature_repo.features import topic_recent_fv
from serving.model_server.refresh import HeldLookups
from serving.model_server.trend import TrendModel
from tests.conftest import DATA_DIR, make_settings, wait_until
from training.data import load_m4_hourly
from training.trend.model import TrendRequest

POLL_SECONDS = 0.3
SERIES = "H1"


def publish(settings: Settings, store: FeatureStore, series: pd.DataFrame) -> None:
    """The training pipeline's feature step for the serving view: write, materialize."""
    path = settings.feast_data_dir / topic_recent_source.path
    path.parent.mkdir(parents=True, exist_ok=True)
    features.topic_recent_frame(series).to_parquet(path, index=False)
    features.materialize(store, series["event_timestamp"].max(), [topic_recent_fv])


@pytest.fixture(scope="module")
def series() -> pd.DataFrame:
    return load_m4_hourly(DATA_DIR / "m4-hourly" / "Hourly-train.csv", limit=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory, series: pd.DataFrame) -> Iterator[tuple[Settings, TrendModel]]:
    home: Path = tmp_path_factory.mktemp("trend-online")
    settings = make_settings(home, CONTENTML_SERVING_POLL_SECONDS=str(POLL_SECONDS))
    store = features.feature_store(settings)
    features.apply_definitions(store)
    publish(settings, store, series)
    model = TrendModel("trend", settings)
    model.load()  # no champion: not ready, but it holds the store and the histories
    yield settings, model
    model.stop()


def history_of(model: TrendModel, series_id: str) -> list[float] | None:
    (inputs,) = model.model_inputs([TrendRequest(series_id=series_id)])
    return inputs.get("history")


def counting_reads(model: TrendModel) -> list[list[str]]:
    """The store reads the predictor makes from now on, each as the ids it asked for."""
    reads: list[list[str]] = []
    read = model.histories.read

    def counted(ids: list[str]) -> dict:
        reads.append(list(ids))
        return read(ids)

    model.histories.read = counted
    return reads


def test_requests_by_id_read_memory_and_see_new_data_within_the_interval(
    served: tuple[Settings, TrendModel], series: pd.DataFrame
) -> None:
    settings, model = served
    last_week = series["interest"].tail(features.RECENT_HOURS).tolist()
    assert history_of(model, SERIES) == last_week  # read through on first use

    reads = counting_reads(model)
    started = time.monotonic()
    for _ in range(50):
        assert history_of(model, SERIES) == last_week
    # Only the background refresh, once per interval, touched the store meanwhile.
    assert len(reads) <= (time.monotonic() - started) / POLL_SECONDS + 1

    later = series.copy()
    later["event_timestamp"] += pd.Timedelta(hours=24)  # a day of new data, every value new
    later["interest"] += 1.0
    publish(settings, model.store, later)
    new_week = later["interest"].tail(features.RECENT_HOURS).tolist()
    wait_until(
        lambda: history_of(model, SERIES) == new_week,
        3 * POLL_SECONDS + 2.0,  # the interval, plus a refresh's own time on a busy machine
        "the newly materialized history served",
    )


def test_an_unknown_series_is_held_as_unknown_and_not_read_again(
    served: tuple[Settings, TrendModel],
) -> None:
    _, model = served
    assert history_of(model, "no-such-series") is None
    reads = counting_reads(model)
    for _ in range(10):
        assert history_of(model, "no-such-series") is None
    # A refresh reads every held id together; a request would read its own id alone.
    assert ["no-such-series"] not in reads


def test_held_lookups_are_bounded_and_refresh_only_what_they_hold() -> None:
    store = {"a": 1, "b": 2, "c": 3}
    reads: list[list[str]] = []

    def read(keys: list[str]) -> dict[str, int | None]:
        reads.append(keys)
        return {k: store.get(k) for k in keys}

    held = HeldLookups(read, entries=2, batch=1)
    assert held.get_many(["a", "b", "a"]) == {"a": 1, "b": 2}
    assert reads == [["a", "b"]]
    held.get_many(["c"])  # evicts the least recently used, a
    assert len(held) == 2
    store.update(b=20, c=30, a=10)
    reads.clear()
    held.refresh()
    assert sorted(reads) == [["b"], ["c"]]  # one batch per key, a not brought back
    assert held.get_many(["b", "c"]) == {"b": 20, "c": 30}
    assert len(reads) == 2  # answered from memory
