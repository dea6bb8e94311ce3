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


def mase_scale(history: np.ndarray) -> float:
    """MASE's denominator: the in-sample mean absolute error of the seasonal naive forecast."""
    scale = np.mean(np.abs(history[SEASONALITY:] - history[:-SEASONALITY]))
    if scale == 0:
        # A flat history has no seasonal error to scale by; fall back to the plain naive error.
        scale = np.mean(np.abs(np.diff(history))) or 1.0
    return float(scale)


def mase(history: np.ndarray, actual: np.ndarray, forecast: np.ndarray) -> float:
    """Mean absolute error scaled by the in-sample seasonal naive error."""
    return float(np.mean(np.abs(actual - forecast)) / mase_scale(history))


def direction(history: np.ndarray, path: np.ndarray) -> int:
    """+1 when the mean of `path` is above the mean of the history's last len(path) points."""
    return 1 if path.mean() > history[-len(path) :].mean() else -1


def seasonal_naive(history: np.ndarray, horizon: int) -> np.ndarray:
    """Repeat the last season: the baseline every forecaster must beat."""
    last_season = history[-SEASONALITY:]
    return np.resize(last_season, horizon)


SEASONALITY_TEST_Z = 1.645
"""One-sided 95 % normal quantile: M4's Naive2 deseasonalizes at the 90 % two-sided level."""


def autocorrelation(history: np.ndarray, lag: int) -> float:
    """Sample autocorrelation at `lag`, normalised by the full-series variance (as M4 does)."""
    centred = history - history.mean()
    denominator = float(np.sum(centred**2))
    if denominator == 0:
        return 0.0
    return float(np.sum(centred[lag:] * centred[:-lag]) / denominator)


def is_seasonal(history: np.ndarray, period: int = SEASONALITY) -> bool:
    """M4's seasonality test: is the autocorrelation at `period` outside the 90 % band?

    The band is Bartlett's: z * sqrt((1 + 2 * sum of squared autocorrelations below the
    period) / n). Series shorter than three periods are never treated as seasonal.
    """
    if len(history) < 3 * period:
        return False
    correlations = np.array([autocorrelation(history, lag) for lag in range(1, period + 1)])
    limit = SEASONALITY_TEST_Z * np.sqrt((1 + 2 * np.sum(correlations[:-1] ** 2)) / len(history))
    return bool(abs(correlations[-1]) > limit)


def seasonal_indices(history: np.ndarray, period: int = SEASONALITY) -> np.ndarray:
    """Classical multiplicative decomposition: one index per phase, averaging 1.

    Phase 0 is the phase of `history[0]`. The trend is the centred 2 x `period` moving average;
    each index is the mean ratio of the series to that trend at its phase.
    """
    weights = np.r_[0.5, np.ones(period - 1), 0.5] / period
    trend = np.convolve(history, weights, mode="valid")
    half = period // 2
    ratios = history[half : half + len(trend)] / trend
    phases = np.arange(half, half + len(trend)) % period
    indices = np.bincount(phases, weights=ratios, minlength=period) / np.bincount(
        phases, minlength=period
    )
    return indices / indices.mean()


def naive2(history: np.ndarray, horizon: int) -> np.ndarray:
    """M4's Naive2, the OWA reference: the last value, re-seasonalised when the test passes.

    Multiplicative indices need a positive series; other series get the plain naive forecast.
    """
    history = np.asarray(history, dtype=float)
    if not (np.all(history > 0) and is_seasonal(history)):
        return np.full(horizon, history[-1])
    indices = seasonal_indices(history)
    n = len(history)
    level = history[-1] / indices[(n - 1) % SEASONALITY]
    return level * indices[(n + np.arange(horizon)) % SEASONALITY]


def owa(smape: float, mase: float, smape_naive2: float, mase_naive2: float) -> float:
    """Overall weighted average: mean of sMAPE and MASE relative to Naive2 (both averaged over
    all series first, as M4 does). Naive2 itself scores 1."""
    return 0.5 * (smape / smape_naive2 + mase / mase_naive2)
