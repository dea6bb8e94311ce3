"""Trend model: metric definitions, request validation, and behaviour of the forecaster."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from training.trend import metrics
from training.trend.model import ProphetConfig, TrendRequest, fit_forecast, forecast_cache
from training.trend.train import evaluate

HOURS = np.arange(24 * 21)
DAILY = 100 + 20 * np.sin(2 * np.pi * HOURS / 24)


def test_smape_matches_the_m4_definition():
    assert metrics.smape(np.array([100.0]), np.array([100.0])) == 0.0
    assert metrics.smape(np.array([100.0]), np.array([0.0])) == pytest.approx(200.0)
    assert metrics.smape(np.array([100.0, 0.0]), np.array([50.0, 0.0])) == pytest.approx(
        100 * (2 * 50 / 150) / 2
    )


def test_mase_is_one_for_the_seasonal_naive_on_a_repeating_error():
    history = np.tile(np.arange(24.0), 3) + np.repeat([0.0, 1.0, 2.0], 24)  # +1 per day
    actual = history[-24:] + 1.0
    assert metrics.mase(history, actual, metrics.seasonal_naive(history, 24)) == 1.0


def test_direction_compares_means_over_the_horizon():
    history = np.array([1.0, 1.0, 1.0, 1.0])
    assert metrics.direction(history, np.array([2.0, 2.0])) == 1
    assert metrics.direction(history, np.array([0.5, 0.5])) == -1


@pytest.mark.parametrize(
    ("instance", "problem"),
    [
        ({}, "series_id or a history"),
        ({"series_id": "H1", "horizon": 0}, "horizon must be between"),
        ({"series_id": "H1", "horizon": 10_000}, "horizon must be between"),
        ({"history": [1.0] * 10}, "history must hold 48"),
        ({"history": [float("nan")] * 48}, "finite"),
        ({"series_id": 5}, "valid string"),
        ({"series_id": "H1", "colour": "red"}, "Extra inputs"),
    ],
)
def test_requests_are_validated(instance, problem):
    with pytest.raises(pydantic.ValidationError, match=problem):
        TrendRequest.model_validate(instance)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="seasonality_mode"):
        ProphetConfig(seasonality_mode="cubic")
    with pytest.raises(ValueError, match="fit_window"):
        ProphetConfig(fit_window=10)


def test_forecast_follows_a_daily_cycle_and_brackets_it():
    result = fit_forecast(DAILY, 48, ProphetConfig(uncertainty_samples=50))
    forecast = np.asarray(result.forecast)
    expected = 100 + 20 * np.sin(2 * np.pi * (HOURS[-1] + 1 + np.arange(48)) / 24)
    assert len(forecast) == 48
    assert metrics.smape(expected, forecast) < 2.0
    assert np.all(np.asarray(result.lower) <= forecast)
    assert np.all(forecast <= np.asarray(result.upper))


@pytest.mark.parametrize(("slope", "expected"), [(1.0, "up"), (-1.0, "down")])
def test_direction_follows_the_trend(slope, expected):
    history = DAILY + slope * HOURS
    assert fit_forecast(history, 48, ProphetConfig(uncertainty_samples=20)).direction == expected


def test_cache_holds_one_forecast_per_series():
    cache = forecast_cache({"a": DAILY, "b": DAILY * 2}, 24, ProphetConfig(uncertainty_samples=20))
    assert list(cache["series_id"]) == ["a", "b"]
    assert all(len(f) == 24 for f in cache["forecast"])
    assert list(cache["tail"][0]) == DAILY[-24:].tolist()


def test_evaluate_scores_model_and_naive_on_the_same_holdout():
    def perfect(requests):
        from training.trend.model import TrendForecast

        out = []
        for r in requests:
            start = len(r.history)
            path = (100 + 20 * np.sin(2 * np.pi * (start + np.arange(r.horizon)) / 24)).tolist()
            out.append(
                TrendForecast(
                    forecast=path, lower=path, upper=path, direction="up", source="fitted"
                )
            )
        return out

    scores = evaluate(perfect, {"a": DAILY, "b": DAILY + 5}, 48)
    assert scores["series"] == 2
    assert scores["smape"] < 3.0 and scores["naive_smape"] < 3.0
    assert scores["smape"] < scores["naive_smape"] or scores["naive_smape"] < 3.0
