"""The trend forecaster: Prophet per series, served as an MLflow pyfunc with a forecast cache."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
from mlflow.pyfunc import PythonModel, PythonModelContext

from training.trend.metrics import SEASONALITY, direction

MIN_HISTORY = 2 * SEASONALITY
"""Prophet needs two full days to separate the daily season from the trend."""

MAX_HORIZON = 7 * SEASONALITY
"""A week ahead is the longest forecast the content planner asks for."""

MAX_HISTORY = 20_000
"""Longer payloads are a client bug, not a forecasting need."""

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

    interval_width: float = 0.8
    """Coverage of the `lower`/`upper` prediction interval."""

    uncertainty_samples: int = 200
    """Simulated paths behind the interval; fewer is faster and noisier."""

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
        if not 0 < self.interval_width < 1:
            raise ValueError("interval_width must be between 0 and 1")
        if self.uncertainty_samples < 1:
            raise ValueError("uncertainty_samples must be at least 1: intervals are served")


class TrendRequest(pydantic.BaseModel):
    """One forecast request: a known series by id, or a raw hourly history."""

    model_config = pydantic.ConfigDict(extra="forbid")

    series_id: str | None = None
    history: list[float] | None = None
    horizon: int = 48

    @pydantic.model_validator(mode="after")
    def _check(self) -> TrendRequest:
        if self.series_id is None and self.history is None:
            raise ValueError("give a series_id or a history")
        if not 1 <= self.horizon <= MAX_HORIZON:
            raise ValueError(f"horizon must be between 1 and {MAX_HORIZON}, not {self.horizon}")
        if self.history is not None:
            if not MIN_HISTORY <= len(self.history) <= MAX_HISTORY:
                raise ValueError(
                    f"history must hold {MIN_HISTORY} to {MAX_HISTORY} hourly "
                    f"values, not {len(self.history)}"
                )
            if not all(math.isfinite(v) for v in self.history):
                raise ValueError("history must hold finite numbers only")
        return self


class TrendForecast(pydantic.BaseModel):
    forecast: list[float]
    lower: list[float]
    upper: list[float]
    direction: str
    source: str
    """`cache` when precomputed by the training pipeline, `fitted` when fitted for this call."""


class UnknownSeries(LookupError):
    """A series id the model has no forecast for, asked for without a history."""


def fit_forecast(history: np.ndarray, horizon: int, config: ProphetConfig) -> TrendForecast:
    """Fit Prophet on the recent history and forecast `horizon` hours with an interval."""
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
        interval_width=config.interval_width,
        uncertainty_samples=config.uncertainty_samples,
    )
    model.fit(frame)
    future = model.make_future_dataframe(periods=horizon, freq="h", include_history=False)
    predicted = model.predict(future)
    point = predicted["yhat"].to_numpy()
    return TrendForecast(
        forecast=point.tolist(),
        lower=predicted["yhat_lower"].tolist(),
        upper=predicted["yhat_upper"].tolist(),
        direction="up" if direction(np.asarray(history, dtype=float), point) > 0 else "down",
        source="fitted",
    )


CACHE_KEY_POINTS = SEASONALITY
"""A cached forecast is valid while the last day of the series is the one it was made from."""


def forecast_cache(
    series: dict[str, np.ndarray], horizon: int, config: ProphetConfig
) -> pd.DataFrame:
    """Forecasts for every known series, precomputed so serving them costs a lookup."""
    rows = []
    for series_id, history in series.items():
        result = fit_forecast(history, horizon, config)
        rows.append(
            {
                "series_id": series_id,
                "tail": history[-CACHE_KEY_POINTS:].tolist(),
                **result.model_dump(),
            }
        )
    return pd.DataFrame(rows)


def save_artifacts(config: ProphetConfig, cache: pd.DataFrame, directory: Path) -> dict[str, str]:
    """Write the files the pyfunc loads; returns them as MLflow `artifacts`."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path, cache_path = directory / "config.json", directory / "forecasts.parquet"
    config_path.write_text(json.dumps(asdict(config), indent=2))
    cache.to_parquet(cache_path, index=False)
    return {"config": str(config_path), "forecasts": str(cache_path)}


class TrendForecaster(PythonModel):
    """MLflow pyfunc: serves cached forecasts for known series, fits Prophet for the rest."""

    def load_context(self, context: PythonModelContext) -> None:
        logging.getLogger("cmdstanpy").setLevel(logging.WARNING)
        self.config = ProphetConfig(**json.loads(Path(context.artifacts["config"]).read_text()))
        cache = pd.read_parquet(context.artifacts["forecasts"])
        self.cache = {row.series_id: row for row in cache.itertuples(index=False)}

    def predict(
        self, model_input: list[TrendRequest], params: dict | None = None
    ) -> list[TrendForecast]:
        return [self._forecast_one(request) for request in model_input]

    def _forecast_one(self, request: TrendRequest) -> TrendForecast:
        cached = self.cache.get(request.series_id) if request.series_id else None
        if (
            cached is not None
            and request.horizon == len(cached.forecast)
            and (
                request.history is None
                or list(request.history[-CACHE_KEY_POINTS:]) == list(cached.tail)
            )
        ):
            return TrendForecast(
                forecast=list(cached.forecast),
                lower=list(cached.lower),
                upper=list(cached.upper),
                direction=cached.direction,
                source="cache",
            )
        if request.history is None:
            raise UnknownSeries(
                f"no forecast for series {request.series_id!r} and no history given to fit one"
            )
        return fit_forecast(np.asarray(request.history), request.horizon, self.config)
