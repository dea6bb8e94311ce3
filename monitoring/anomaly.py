"""CrisisManager's anomaly detection on channel metrics: a robust z-score of each new point
against the channel's own recent history, per metric, so a channel is flagged within one
observation interval (minutes, at the content pipeline's polling rate).

Robust z-score (Iglewicz and Hoaglin): (x - median) / (1.4826 * MAD) over the last `window`
points before x. Median and MAD ignore the spikes they are meant to find, unlike a mean and
standard deviation, and need no training: a new channel is watched from its `min_history`-th
point. Strikes are policy events, not noise: any new strike flags the channel.

Limit: the window is not de-seasonalised, so a strong daily cycle widens the MAD; on M4's
hourly series a tenfold jump or collapse is flagged on its first point, a fivefold one may not
be.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

METRICS = ("views", "likes", "comment_rate")
"""Continuous channel metrics scored by robust z-score."""

LOG_SCALED = ("views", "likes")
"""Counts grow and shrink by factors, not by amounts: they are scored as log1p, so a channel
of 10 M views and one of 10 k are held to the same relative change."""

STRIKES = "strikes"
"""Cumulative policy strikes of a channel: an increase is an anomaly by itself."""

MAD_SCALE = 1.4826
"""Makes the MAD a consistent estimate of the standard deviation for normal data."""


@dataclass(frozen=True)
class AnomalyConfig:
    window: int = 24
    """Points of a channel's history a new point is compared with (a day of hourly points)."""

    min_history: int = 8
    """Points needed before a channel's metric is scored at all."""

    threshold: float = 3.5
    """|robust z| above which a point is an anomaly (Iglewicz and Hoaglin's cut-off)."""

    min_relative_mad: float = 0.01
    """Floor of the MAD as a share of the median: a flat series (MAD 0) would make any change
    infinitely anomalous."""

    def __post_init__(self) -> None:
        if self.window < 3 or not 3 <= self.min_history <= self.window:
            raise ValueError(
                f"need 3 <= min_history <= window, got {self.min_history} and {self.window}"
            )
        if not self.threshold > 0 or self.min_relative_mad < 0:
            raise ValueError("threshold must be positive and min_relative_mad non-negative")


@dataclass(frozen=True)
class Anomaly:
    channel_id: str
    event_timestamp: pd.Timestamp
    metric: str
    value: float
    """As scored: log1p of the count for `LOG_SCALED` metrics."""
    baseline: float
    """The median of the window the point was compared with (log1p for `LOG_SCALED`)."""
    score: float
    """Robust z-score (inf for a new strike)."""


def robust_z(value: float, history: np.ndarray, config: AnomalyConfig) -> float:
    """The robust z-score of `value` against `history`."""
    median = float(np.median(history))
    mad = float(np.median(np.abs(history - median)))
    scale = MAD_SCALE * max(mad, config.min_relative_mad * abs(median), 1e-12)
    return (value - median) / scale


class MetricHistory(Protocol):
    """Where a monitor keeps each channel's recent points: in memory for a replay
    (`MemoryHistory`), in the shared SQL store for the model server's replicas
    (`monitoring.crisis.SqlMetricHistory`)."""

    def recent(self, channel_id: str, metric: str, count: int) -> list[float]:
        """The last `count` points of the channel's metric, oldest first."""
        ...

    def append(self, channel_id: str, metric: str, value: float, keep: int) -> None:
        """Add a point, keeping the last `keep` of the channel's metric."""
        ...


class MemoryHistory:
    """A `MetricHistory` in this process's memory."""

    def __init__(self) -> None:
        self._points: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def recent(self, channel_id: str, metric: str, count: int) -> list[float]:
        points = self._points.get((channel_id, metric), ())
        return list(points)[-count:]

    def append(self, channel_id: str, metric: str, value: float, keep: int) -> None:
        points = self._points[(channel_id, metric)]
        points.append(value)
        while len(points) > keep:
            points.popleft()


class CrisisMonitor:
    """Streaming detector: `observe` each new point of a channel, get the anomalies it shows.

    Keeps the last `window` points per (channel, metric), and the last strike count, in its
    `history`; thread-safe, so the model server's request threads can share one. Points of one
    channel are scored one at a time (each against the points before it); channels do not wait
    on each other's history reads and writes (SQL in the server).
    """

    def __init__(self, config: AnomalyConfig | None = None, history: MetricHistory | None = None):
        self.config = config or AnomalyConfig()
        self.history = history or MemoryHistory()
        self._channel_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_lock = threading.Lock()

    def _channel_lock(self, channel_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._channel_locks[channel_id]

    def observe(self, channel_id: str, event_timestamp: pd.Timestamp, point: dict) -> list[Anomaly]:
        """Score `point` (`METRICS` and optionally `STRIKES` by name) against the channel's
        history, then add it to the history."""
        found = []
        window = self.config.window
        with self._channel_lock(channel_id):
            for metric in METRICS:
                if metric not in point:
                    continue
                value = float(point[metric])
                if metric in LOG_SCALED:
                    value = float(np.log1p(max(value, 0.0)))
                history = self.history.recent(channel_id, metric, window)
                if len(history) >= self.config.min_history:
                    past = np.asarray(history, dtype=float)
                    score = robust_z(value, past, self.config)
                    if abs(score) > self.config.threshold:
                        found.append(
                            Anomaly(
                                channel_id,
                                event_timestamp,
                                metric,
                                value,
                                float(np.median(past)),
                                score,
                            )
                        )
                self.history.append(channel_id, metric, value, window)
            if STRIKES in point:
                strikes = float(point[STRIKES])
                (before,) = self.history.recent(channel_id, STRIKES, 1) or (strikes,)
                if strikes > before:
                    found.append(
                        Anomaly(channel_id, event_timestamp, STRIKES, strikes, before, np.inf)
                    )
                self.history.append(channel_id, STRIKES, strikes, 1)
        return found


def detect_anomalies(frame: pd.DataFrame, config: AnomalyConfig | None = None) -> pd.DataFrame:
    """Every anomaly in a metrics frame (`channel_id`, `event_timestamp`, metric columns),
    replayed in time order through a `CrisisMonitor`: the batch view of the streaming one."""
    missing = {"channel_id", "event_timestamp"} - set(frame.columns)
    if missing:
        raise ValueError(f"channel metrics need columns {sorted(missing)}")
    monitor = CrisisMonitor(config)
    metrics = [c for c in (*METRICS, STRIKES) if c in frame.columns]
    found = []
    for row in frame.sort_values("event_timestamp").itertuples(index=False):
        point = {m: getattr(row, m) for m in metrics if pd.notna(getattr(row, m))}
        found += monitor.observe(row.channel_id, row.event_timestamp, point)
    columns = list(Anomaly.__dataclass_fields__)
    return pd.DataFrame([a.__dict__ for a in found], columns=columns)


def channel_metrics(videos: pd.DataFrame) -> pd.DataFrame:
    """Daily channel metrics from the trending snapshots (`load_youtube_trending`): total
    views and likes of the channel's trending videos, and comments per view."""
    daily = videos.groupby(["channel_id", "event_timestamp"], as_index=False)[
        ["views", "likes", "comment_total"]
    ].sum()
    views = daily["views"].astype(float)
    daily["comment_rate"] = (daily["comment_total"] / views.where(views > 0)).fillna(0.0)
    return daily[["channel_id", "event_timestamp", *METRICS]]
