"""Forecast accuracy as the M4 competition scores it, plus the roadmap's direction accuracy."""

from __future__ import annotations

import numpy as np

SEASONALITY = 24
"""Hourly series repeat daily; M4 scales MASE by the seasonal naive error at m = 24."""


def smape(actual: np.ndarray, forecast: np.ndarray) -> float:
    """Symmetric MAPE in percent (M4 definition, 0..200)."""
    denominator = np.abs(actual) + np.abs(forecast)
    ratio = np.divide(
        2.0 * np.abs(forecast - actual),
        denominator,
        out=np.zeros_like(denominator, dtype=float),
        where=denominator > 0,
    )
    return float(100.0 * ratio.mean())


def mase(history: np.ndarray, actual: np.ndarray, forecast: np.ndarray) -> float:
    """Mean absolute error scaled by the in-sample seasonal naive error."""
    scale = np.mean(np.abs(history[SEASONALITY:] - history[:-SEASONALITY]))
    if scale == 0:
        # A flat history has no seasonal error to scale by; fall back to the plain naive error.
        scale = np.mean(np.abs(np.diff(history))) or 1.0
    return float(np.mean(np.abs(actual - forecast)) / scale)


def direction(history: np.ndarray, path: np.ndarray) -> int:
    """+1 when the mean of `path` is above the mean of the history's last len(path) points."""
    return 1 if path.mean() > history[-len(path) :].mean() else -1


def seasonal_naive(history: np.ndarray, horizon: int) -> np.ndarray:
    """Repeat the last season: the baseline every forecaster must beat."""
    last_season = history[-SEASONALITY:]
    return np.resize(last_season, horizon)
