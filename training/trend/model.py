"""The trend model's request and response types, and Prophet, one member of its ensemble."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pydantic

from training.trend.metrics import SEASONALITY

MIN_HISTORY = 2 * SEASONALITY
"""Prophet needs two full days to separate the daily season from the trend."""

MAX_HORIZON = 7 * SEASONALITY
"""A week ahead is the longest forecast the content planner asks for."""

MAX_HISTORY = 20_000
"""Longer payloads are a client bug, not a forecasting need."""

MAX_INTEREST = 1e12
"""Largest hourly value taken (in size): far above any topic's views per hour, and small
enough that the members' sums and squares stay finite, so a forecast is never NaN or inf."""

MAX_SERIES_ID = 256

# Prophet fits on an hourly index; M4 histories carry no timestamps, so every history is placed
# to end at the same hour (daily and weekly phases are learned from the data, not the calendar).
HISTORY_END = pd.Timestamp("2025-01-01 00:00")


@dataclass(frozen=True)
class ProphetConfig:
    seasonality_mode: str = "multiplicative"
    """`additive` or `multiplicative` daily/weekly seasonality."""

    changepoint_prior_scale: float = 0.05
    """Trend flexibility: larger follows level shifts faster, and overfits sooner."""

    weekly_seasonality: bool = True
    """Model the day-of-week cycle on top of the daily one."""

    fit_window: int = 28 * SEASONALITY
    """Hours of the most recent history the model fits on; older data rarely helps at 48 h."""

    def __post_init__(self) -> None:
        if self.seasonality_mode not in ("additive", "multiplicative"):
            raise ValueError(
                f"seasonality_mode must be additive or multiplicative, "
                f"not {self.seasonality_mode!r}"
            )
        if not self.changepoint_prior_scale > 0:
            raise ValueError("changepoint_prior_scale must be positive")
        if self.fit_window < MIN_HISTORY:
            raise ValueError(f"fit_window must be at least {MIN_HISTORY} hours")


class TrendRequest(pydantic.BaseModel):
    """One forecast request: a known series by id, or a raw hourly history."""

    model_config = pydantic.ConfigDict(extra="forbid")

    series_id: str | None = None
    history: list[float] | None = None
    horizon: int = 48

    @pydantic.field_validator("series_id")
    @classmethod
    def _short_id(cls, series_id: str | None) -> str | None:
        if series_id is not None and len(series_id) > MAX_SERIES_ID:
            # Errors quote the id: a longer one is refused, not echoed.
            raise ValueError(f"series_id must have at most {MAX_SERIES_ID} characters")
        return series_id

    @pydantic.field_validator("history")
    @classmethod
    def _usable_history(cls, history: list[float] | None) -> list[float] | None:
        if history is None:
            return history
        if not MIN_HISTORY <= len(history) <= MAX_HISTORY:
            raise ValueError(
                f"history must hold {MIN_HISTORY} to {MAX_HISTORY} hourly values, "
                f"not {len(history)}"
            )
        if not all(math.isfinite(v) for v in history):
            raise ValueError("history must hold finite numbers only")
        if not all(abs(v) <= MAX_INTEREST for v in history):
            raise ValueError(f"history values must lie within ±{MAX_INTEREST:g}")
        return history

    @pydantic.field_validator("horizon")
    @classmethod
    def _horizon_in_range(cls, horizon: int) -> int:
        if not 1 <= horizon <= MAX_HORIZON:
            raise ValueError(f"horizon must be between 1 and {MAX_HORIZON}, not {horizon}")
        return horizon

    @pydantic.model_validator(mode="after")
    def _series_or_history(self) -> TrendRequest:
        if self.series_id is None and self.history is None:
            raise ValueError("give a series_id or a history")
        return self


class TrendForecast(pydantic.BaseModel):
    forecast: list[float]
    lower: list[float]
    """Lower bound of the 80 % prediction interval."""
    upper: list[float]
    lower_95: list[float]
    upper_95: list[float]
    direction: str
    """`up` when the forecast's mean is above the mean of as many last hours of history."""
    source: str
    """`cache` when precomputed by the training pipeline, `fitted` when fitted for this call."""


class UnknownSeries(LookupError):
    """A series id the model has no forecast for, asked for without a history."""


def fit_forecast(history: np.ndarray, horizon: int, config: ProphetConfig) -> np.ndarray:
    """Fit Prophet on the recent history and forecast `horizon` hours (the point forecast:
    the ensemble sets intervals from validation errors, so Prophet's sampling is skipped)."""
    from prophet import Prophet  # Imported here: it loads Stan, which only fitting needs.

    window = np.asarray(history[-config.fit_window :], dtype=float)
    frame = pd.DataFrame(
        {
            "ds": pd.date_range(end=HISTORY_END, periods=len(window), freq="h"),
            "y": window,
        }
    )
    model = Prophet(
        seasonality_mode=config.seasonality_mode,
        changepoint_prior_scale=config.changepoint_prior_scale,
        daily_seasonality=True,
        weekly_seasonality=config.weekly_seasonality,
        yearly_seasonality=False,
        uncertainty_samples=0,
    )
    model.fit(frame)
    future = model.make_future_dataframe(periods=horizon, freq="h", include_history=False)
    return model.predict(future)["yhat"].to_numpy()
