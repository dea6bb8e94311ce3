"""CrisisManager's anomaly detection: quiet on real hourly series, a spike or a new strike
flagged on the point that shows it."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from monitoring.anomaly import (
    AnomalyConfig,
    CrisisMonitor,
    MemoryHistory,
    channel_metrics,
    detect_anomalies,
)
from tests.conftest import DATA_DIR
from training.data import load_m4_hourly, load_youtube_trending


@pytest.fixture(scope="module")
def hourly_views() -> pd.DataFrame:
    # M4's hourly series stand in for channels' hourly views: real, seasonal, noisy.
    series = load_m4_hourly(DATA_DIR / "m4-hourly" / "Hourly-train.csv", limit=50)
    return series.rename(columns={"series_id": "channel_id", "interest": "views"})


def test_real_series_raise_almost_no_alarms(hourly_views: pd.DataFrame):
    found = detect_anomalies(hourly_views)
    assert len(found) / len(hourly_views) < 0.001


@pytest.mark.parametrize("factor", [10.0, 0.1])
def test_a_spike_or_a_collapse_is_flagged_on_the_point_itself(hourly_views, factor: float):
    channel = hourly_views[hourly_views["channel_id"] == "H1"].reset_index(drop=True)
    hit = channel.index[200]
    channel.loc[hit, "views"] *= factor
    found = detect_anomalies(channel)
    assert channel.loc[hit, "event_timestamp"] in set(found["event_timestamp"])
    (row,) = found[found["event_timestamp"] == channel.loc[hit, "event_timestamp"]].itertuples()
    assert row.metric == "views" and (row.score > 0) == (factor > 1)


def test_a_new_strike_is_an_anomaly_whatever_the_history():
    monitor = CrisisMonitor()
    day = pd.Timestamp("2026-11-26", tz="UTC")
    assert monitor.observe("ch_a", day, {"strikes": 0}) == []
    assert monitor.observe("ch_a", day, {"strikes": 0}) == []
    (strike,) = monitor.observe("ch_a", day, {"strikes": 1})
    assert strike.metric == "strikes" and strike.baseline == 0 and strike.value == 1


def test_a_channel_is_scored_only_once_it_has_history():
    monitor = CrisisMonitor(AnomalyConfig(window=10, min_history=5))
    day = pd.Timestamp("2026-11-26", tz="UTC")
    for views in (100, 110, 90, 105):
        assert monitor.observe("ch_b", day, {"views": views}) == []
    assert monitor.observe("ch_b", day, {"views": 100_000}) == []  # 4 points: not scored yet
    monitor = CrisisMonitor(AnomalyConfig(window=10, min_history=5))
    for views in (100, 110, 90, 105, 95):
        monitor.observe("ch_b", day, {"views": views})
    assert [a.metric for a in monitor.observe("ch_b", day, {"views": 100_000})] == ["views"]


def test_channel_metrics_from_the_trending_data():
    metrics = channel_metrics(load_youtube_trending(DATA_DIR))
    assert list(metrics.columns) == [
        "channel_id",
        "event_timestamp",
        "views",
        "likes",
        "comment_rate",
    ]
    assert not metrics.duplicated(["channel_id", "event_timestamp"]).any()
    assert (metrics["comment_rate"] >= 0).all()


@pytest.mark.parametrize(
    "fields", [{"window": 2}, {"min_history": 30}, {"threshold": 0}, {"min_relative_mad": -1}]
)
def test_impossible_settings_are_refused(fields: dict):
    with pytest.raises(ValueError):
        AnomalyConfig(**fields)


def test_a_frame_without_keys_is_refused():
    with pytest.raises(ValueError, match=r"columns \['channel_id'\]"):
        detect_anomalies(pd.DataFrame({"event_timestamp": [], "views": []}))


class BlockingHistory(MemoryHistory):
    """A history whose reads for one channel wait until released, like a slow SQL store."""

    def __init__(self, blocked_channel: str):
        super().__init__()
        self.blocked_channel = blocked_channel
        self.reading = threading.Event()
        self.release = threading.Event()

    def recent(self, channel_id: str, metric: str, count: int) -> list[float]:
        if channel_id == self.blocked_channel:
            self.reading.set()
            assert self.release.wait(10)
        return super().recent(channel_id, metric, count)


def test_a_slow_channel_does_not_hold_up_another():
    history = BlockingHistory("slow")
    monitor = CrisisMonitor(history=history)
    point = {"views": 100.0}
    slow = threading.Thread(target=monitor.observe, args=("slow", pd.Timestamp(0), point))
    slow.start()
    assert history.reading.wait(10)
    fast = threading.Thread(target=monitor.observe, args=("fast", pd.Timestamp(0), point))
    fast.start()
    fast.join(5)
    try:
        assert not fast.is_alive(), "a channel waited on another channel's history read"
        assert history.recent("fast", "views", 1) != []
    finally:
        history.release.set()
        slow.join(10)
        fast.join(10)
