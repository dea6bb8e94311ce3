"""The trend model as MLflow stores and serves it: the fitted ensemble behind a pyfunc that
answers known series from the forecasts precomputed at training and fits unseen histories
with the ensemble's fast members."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext

from training.trend.ensemble import Forecast, TrendEnsemble, load_ensemble
from training.trend.model import TrendForecast, TrendRequest, UnknownSeries


def _response(forecast: Forecast, source: str) -> TrendForecast:
    return TrendForecast(
        forecast=forecast.point.tolist(),
        lower=forecast.lower_80.tolist(),
        upper=forecast.upper_80.tolist(),
        lower_95=forecast.lower_95.tolist(),
        upper_95=forecast.upper_95.tolist(),
        direction="up" if forecast.direction > 0 else "down",
        source=source,
    )


def is_current(ensemble: TrendEnsemble, series_id: str, history: list[float] | None) -> bool:
    """A precomputed forecast holds while the series still ends as it did at training."""
    if series_id not in ensemble.series_ids:
        return False
    if history is None:
        return True
    tail = ensemble.tails[ensemble.series_ids.index(series_id)]
    return len(history) >= len(tail) and np.array_equal(history[-len(tail) :], tail)


class TrendForecaster(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        self.ensemble = load_ensemble(Path(context.artifacts["ensemble"]))

    def predict(
        self, model_input: list[TrendRequest], params: dict | None = None
    ) -> list[TrendForecast]:
        return [self._forecast_one(request) for request in model_input]

    def _forecast_one(self, request: TrendRequest) -> TrendForecast:
        if request.series_id and is_current(self.ensemble, request.series_id, request.history):
            return _response(
                self.ensemble.forecast_known(request.series_id, request.horizon), "cache"
            )
        if request.history is None:
            raise UnknownSeries(
                f"no forecast for series {request.series_id!r} and no history given to fit one"
            )
        return _response(self.ensemble.forecast_history(request.history, request.horizon), "fitted")
