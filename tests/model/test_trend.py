"""Trend model: metric definitions, request validation, and behaviour of the forecaster."""

from __future__ import annotations

import mlflow
import numpy as np
import pydantic
import pytest

from training.trend import metrics
from training.trend.ensemble import EnsembleConfig
from training.trend.forecasters import BoostingConfig, ForecasterConfig, ForecastInputError, Member
from training.trend.model import ProphetConfig, TrendRequest, UnknownSeries, fit_forecast
from training.trend.steps import ensemble_config
from training.trend.train import evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")

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
        ({"history": [1.0] * 47 + [1.7e308]}, "values must lie within"),
        ({"history": [-2e12] + [1.0] * 47}, "values must lie within"),
        ({"series_id": 5}, "valid string"),
        ({"series_id": "H" * 257}, "at most 256 characters"),
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


def test_prophet_member_follows_a_daily_cycle():
    forecast = fit_forecast(DAILY, 48, ProphetConfig())
    expected = 100 + 20 * np.sin(2 * np.pi * (HOURS[-1] + 1 + np.arange(48)) / 24)
    assert forecast.shape == (48,)
    assert metrics.smape(expected, forecast) < 2.0


@pytest.mark.parametrize(("slope", "expected"), [(1.0, 1), (-1.0, -1)])
def test_prophet_member_follows_the_trend(slope, expected):
    history = DAILY + slope * HOURS
    assert metrics.direction(history, fit_forecast(history, 48, ProphetConfig())) == expected


# Two quick members and a small boosting model keep these tests fast; the full ensemble is
# scored on all of M4 by the backtest.
SMALL = EnsembleConfig(
    members=(Member.SEASONAL_NAIVE_DAY, Member.GLOBAL_BOOSTING),
    forecasters=ForecasterConfig(boosting=BoostingConfig(max_iter=30)),
)


@pytest.fixture(scope="module")
def series() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    hours = np.arange(24 * 28)
    daily = 100 + 20 * np.sin(2 * np.pi * hours / 24)
    return {f"S{i}": daily * (i + 1) + rng.normal(0, 1, len(hours)) for i in range(4)}


@pytest.fixture(scope="module")
def saved_model(series, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("trend") / "model"
    train(series, SMALL, model_dir, workers=1)
    return mlflow.pyfunc.load_model(str(model_dir))


def test_pyfunc_serves_known_series_from_the_cache(saved_model, series):
    (known,) = saved_model.predict([{"series_id": "S1", "horizon": 48}])
    assert known.source == "cache" and len(known.forecast) == 48
    assert all(
        lo95 <= lo <= f <= hi <= hi95
        for lo95, lo, f, hi, hi95 in zip(
            known.lower_95, known.lower, known.forecast, known.upper, known.upper_95, strict=True
        )
    )
    (current,) = saved_model.predict(
        [{"series_id": "S1", "history": series["S1"].tolist(), "horizon": 48}]
    )
    assert current.source == "cache"
    assert current.forecast == known.forecast


def test_pyfunc_refits_when_the_series_moved_on(saved_model, series):
    newer = np.append(series["S1"], series["S1"][-24:]).tolist()
    (moved,) = saved_model.predict([{"series_id": "S1", "history": newer, "horizon": 24}])
    assert moved.source == "fitted" and len(moved.forecast) == 24


def test_pyfunc_refuses_what_it_cannot_forecast(saved_model):
    with pytest.raises(UnknownSeries, match="S99"):
        saved_model.predict([{"series_id": "S99", "horizon": 48}])
    with pytest.raises(ForecastInputError, match="horizon must be between 1 and 48"):
        saved_model.predict([{"history": DAILY.tolist(), "horizon": 72}])


def test_evaluate_refits_the_saved_configuration_on_the_holdout(saved_model, series):
    config = saved_model.unwrap_python_model().ensemble.config
    scores = evaluate(series, config, workers=1)
    assert scores["series"] == 4
    # Clean daily cycles with unit noise: a few percent at most.
    assert scores["smape"] < 3.0 and np.isfinite(scores["owa"])
    assert {"smape", "mase", "direction_accuracy", "coverage_80", "naive2_owa"} <= set(scores)
    assert scores["naive2_owa"] == pytest.approx(1.0)


def test_members_come_from_the_pipeline_parameter():
    config = ensemble_config(24, "seasonal_naive_day, global_boosting", 1)
    assert config.members == (Member.SEASONAL_NAIVE_DAY, Member.GLOBAL_BOOSTING)
    assert (config.horizon, config.validation_origins) == (24, 1)
    with pytest.raises(ValueError, match="unknown trend members"):
        ensemble_config(48, "seasonal_naive_day,crystal_ball", 2)
