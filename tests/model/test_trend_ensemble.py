"""Trend ensemble: M4 metrics, the forecaster family, validation-chosen weights, intervals,
persistence, the fast path for unseen histories and the M4-format backtest."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import DATA_DIR
from training.data import DataError
from training.trend import metrics
from training.trend.backtest import holdout_report, run_backtest
from training.trend.ensemble import (
    SERIES_PER_WORKER,
    EnsembleConfig,
    LocalRunner,
    TrendEnsemble,
    load_ensemble,
    save_ensemble,
)
from training.trend.forecasters import (
    MEMBER_KINDS,
    WEEK,
    BoostingConfig,
    ForecasterConfig,
    ForecastInputError,
    Member,
    MlpConfig,
    build_forecaster,
    pad_history,
)
from training.trend.model import UnknownSeries

M4_TRAIN = DATA_DIR / "m4-hourly" / "Hourly-train.csv"

# Global models small enough to train in a second or two: these tests check behaviour, not skill.
SMALL = ForecasterConfig(
    boosting=BoostingConfig(max_iter=30, samples_per_window=2),
    mlp=MlpConfig(hidden=32, epochs=2),
)
HORIZON = 48
LENGTH = 600
"""Long enough for a global training window before the first validation origin."""


def _daily(seed: int, length: int = LENGTH) -> np.ndarray:
    """A noisy daily cycle on a slow trend."""
    rng = np.random.default_rng(seed)
    hours = np.arange(length)
    level = 100 + 20 * seed + 0.02 * hours
    return level * (1 + 0.3 * np.sin(2 * np.pi * hours / 24)) + rng.normal(0, 2, length)


def _weekly(length: int = LENGTH, seed: int = 99) -> np.ndarray:
    """An exactly repeating, irregular weekly cycle: the weekly seasonal naive is perfect."""
    week = np.random.default_rng(seed).uniform(50, 150, WEEK)
    return np.resize(week, length)


SERIES = {f"daily{i}": _daily(i) for i in range(4)} | {"weekly": _weekly()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ensemble() -> TrendEnsemble:
    config = EnsembleConfig(horizon=HORIZON, forecasters=SMALL)
    return TrendEnsemble(config).fit(SERIES)


# --- metrics ----------------------------------------------------------------------------------


def test_seasonal_indices_are_the_pattern_divided_by_its_mean():
    history = np.tile([1.0, 2.0, 3.0, 2.0], 6)
    np.testing.assert_allclose(metrics.seasonal_indices(history, 4), [0.5, 1.0, 1.5, 1.0])


def test_naive2_continues_the_daily_pattern_of_a_seasonal_series():
    pattern = 1 + 0.5 * np.sin(2 * np.pi * np.arange(24) / 24)
    history = 100 * np.tile(pattern, 5)
    assert metrics.is_seasonal(history)
    np.testing.assert_allclose(metrics.naive2(history, 48), 100 * np.tile(pattern, 2))


def test_naive2_is_the_last_value_without_seasonality():
    noise = 100 + np.random.default_rng(0).normal(0, 1, 24 * 5)
    assert not metrics.is_seasonal(noise)
    np.testing.assert_array_equal(metrics.naive2(noise, 3), [noise[-1]] * 3)
    short = 100 * np.tile(1 + 0.5 * np.sin(2 * np.pi * np.arange(24) / 24), 2)
    assert not metrics.is_seasonal(short)  # fewer than three seasons: never deseasonalised


def test_owa_is_one_for_naive2_and_averages_the_two_ratios():
    assert metrics.owa(18.4, 2.4, 18.4, 2.4) == 1.0
    assert metrics.owa(10.0, 2.0, 20.0, 4.0) == pytest.approx(0.5)
    assert metrics.owa(10.0, 4.0, 20.0, 4.0) == pytest.approx(0.75)


def test_mase_scale_is_the_in_sample_seasonal_naive_error():
    history = np.arange(48.0)  # every value is 24 above the one a day earlier
    assert metrics.mase_scale(history) == 24.0


# --- forecasters ------------------------------------------------------------------------------


def test_padding_keeps_the_daily_phase():
    hours = np.arange(50)
    history = 100.0 * (hours // 24) + hours % 24  # the hour of day is the value modulo 100
    padded = pad_history(history, 2 * WEEK)
    assert len(padded) == 2 * WEEK
    np.testing.assert_array_equal(padded[-50:], history)
    phase = (np.arange(2 * WEEK) - (2 * WEEK - 50)) % 24
    np.testing.assert_array_equal(padded % 100, phase)


@pytest.mark.parametrize("member", list(Member))
def test_each_forecaster_returns_horizon_finite_values(member):
    forecaster = build_forecaster(member, SMALL)
    forecaster.fit(list(SERIES.values()), HORIZON)
    for history in (SERIES["daily1"], SERIES["daily1"][:48]):  # long, and the shortest allowed
        forecast = forecaster.forecast(history, HORIZON)
        assert forecast.shape == (HORIZON,)
        assert np.isfinite(forecast).all()


def test_global_forecasters_need_fitting_and_respect_the_fitted_horizon():
    forecaster = build_forecaster(Member.GLOBAL_BOOSTING, SMALL)
    with pytest.raises(ForecastInputError, match="must be fitted"):
        forecaster.forecast(SERIES["daily0"], HORIZON)
    forecaster.fit(list(SERIES.values()), 24)
    with pytest.raises(ForecastInputError, match="between 1 and 24"):
        forecaster.forecast(SERIES["daily0"], HORIZON)


def test_global_forecaster_follows_the_scale_of_an_unseen_series():
    forecaster = build_forecaster(Member.GLOBAL_BOOSTING, SMALL)
    forecaster.fit(list(SERIES.values()), HORIZON)
    small = forecaster.forecast(_daily(7), HORIZON)
    large = forecaster.forecast(1000 * _daily(7), HORIZON)
    np.testing.assert_allclose(large, 1000 * small, rtol=1e-4)


# --- ensemble ---------------------------------------------------------------------------------


def test_weights_follow_validation_errors(ensemble):
    row = ensemble.series_ids.index("weekly")
    members = ensemble.config.members
    weights = dict(zip(members, ensemble.weights[row], strict=True))
    assert max(weights, key=weights.get) == Member.SEASONAL_NAIVE_WEEK
    # Its own errors give it (almost) all of their share, whatever the shared weights say.
    assert weights[Member.SEASONAL_NAIVE_WEEK] > 0.49
    np.testing.assert_allclose(ensemble.weights.sum(axis=1), 1.0)
    np.testing.assert_allclose(ensemble.global_weights.sum(), 1.0)
    slow = [not MEMBER_KINDS[m].fast for m in members]
    assert (ensemble.fast_weights[slow] == 0).all()


def test_shared_weights_favour_the_member_best_across_series():
    series = {f"weekly{seed}": _weekly(seed=seed) for seed in range(3)}
    members = (Member.SEASONAL_NAIVE_DAY, Member.SEASONAL_NAIVE_WEEK, Member.GLOBAL_BOOSTING)
    config = EnsembleConfig(members=members, forecasters=SMALL)
    fitted = TrendEnsemble(config).fit(series)
    assert fitted.global_weights[1] > 0.9
    assert fitted.fast_weights[1] > 0.9


def _assert_nested(forecast) -> None:
    assert np.isfinite(forecast.point).all()
    assert (forecast.lower_95 <= forecast.lower_80).all()
    assert (forecast.lower_80 <= forecast.point).all()
    assert (forecast.point <= forecast.upper_80).all()
    assert (forecast.upper_80 <= forecast.upper_95).all()
    assert (forecast.lower_95 < forecast.upper_95).any()


def test_known_series_get_their_precomputed_forecast_with_nested_intervals(ensemble):
    forecast = ensemble.forecast_known("daily2", HORIZON)
    row = ensemble.series_ids.index("daily2")
    np.testing.assert_array_equal(forecast.point, ensemble.forecasts[row])
    _assert_nested(forecast)
    assert forecast.direction == metrics.direction(SERIES["daily2"], forecast.point)
    assert len(ensemble.forecast_known("daily2", 12).upper_95) == 12


def test_unseen_histories_take_the_fast_path(ensemble):
    history = _daily(11)
    ensemble.forecast_history(history, HORIZON)  # warm-up: first calls load code paths
    started = time.perf_counter()
    forecast = ensemble.forecast_history(history, HORIZON)
    assert time.perf_counter() - started < 0.5
    _assert_nested(forecast)
    # A near-perfect weekly series: the forecast should track its continuation.
    weekly = _weekly(LENGTH + HORIZON)
    forecast = ensemble.forecast_history(weekly[:-HORIZON], HORIZON)
    assert metrics.smape(weekly[-HORIZON:], forecast.point) < 20
    _assert_nested(ensemble.forecast_history(history[:48], 24))


def test_save_and_load_give_identical_forecasts(ensemble, tmp_path):
    loaded = load_ensemble(save_ensemble(ensemble, tmp_path / "model"))
    assert loaded.config == ensemble.config
    assert loaded.series_ids == ensemble.series_ids
    for series_id in ensemble.series_ids:
        a, b = (
            ensemble.forecast_known(series_id, HORIZON),
            loaded.forecast_known(series_id, HORIZON),
        )
        np.testing.assert_array_equal(a.point, b.point)
        np.testing.assert_array_equal(a.lower_95, b.lower_95)
    history = _daily(12)
    a, b = ensemble.forecast_history(history, HORIZON), loaded.forecast_history(history, HORIZON)
    np.testing.assert_array_equal(a.point, b.point)
    np.testing.assert_array_equal(a.upper_80, b.upper_80)
    np.testing.assert_array_equal(loaded.member_forecasts, ensemble.member_forecasts)


@pytest.mark.parametrize(
    ("series", "problem"),
    [
        ({}, "no series"),
        ({"a": np.full(LENGTH, np.nan)}, "'a': a history must hold finite"),
        ({"a": np.ones(100)}, "'a' has 100 values, fewer than the 144"),
        ({"a": np.ones((LENGTH, 2))}, "one-dimensional"),
    ],
)
def test_fit_rejects_bad_series(series, problem):
    with pytest.raises(ForecastInputError, match=problem):
        TrendEnsemble(EnsembleConfig(forecasters=SMALL)).fit(series)


def test_forecasts_reject_bad_requests(ensemble):
    with pytest.raises(UnknownSeries, match="nope"):
        ensemble.forecast_known("nope", HORIZON)
    with pytest.raises(ForecastInputError, match="horizon must be between 1 and 48"):
        ensemble.forecast_known("daily0", HORIZON + 1)
    with pytest.raises(ForecastInputError, match="at least 48 hourly values"):
        ensemble.forecast_history(np.ones(47), 24)
    with pytest.raises(ForecastInputError, match="finite"):
        ensemble.forecast_history([1.0, float("inf")] * 30, 24)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"temperature": 0}, "temperature"),
        ({"members": (Member.GLOBAL_MLP, Member.GLOBAL_MLP)}, "each once"),
        ({"members": (Member.MSTL_ETS,)}, "fast forecaster"),
        ({"members": ("arima",)}, "unknown members"),
        ({"global_share": 1.5}, "global_share"),
        ({"validation_origins": 0}, "validation_origins"),
    ],
)
def test_config_rejects_bad_values(settings, problem):
    with pytest.raises(ValueError, match=problem):
        EnsembleConfig(**settings)


def test_forecaster_configs_reject_bad_values():
    with pytest.raises(ValueError, match="input_length"):
        BoostingConfig(input_length=24)
    with pytest.raises(ValueError, match="epochs"):
        MlpConfig(epochs=0)


def test_workers_start_only_for_enough_series_and_forecast_as_this_process_does():
    assert LocalRunner(4, SERIES_PER_WORKER - 1).workers == 1
    assert LocalRunner(4, 3 * SERIES_PER_WORKER).workers == 3
    rng = np.random.default_rng(0)
    histories = [[rng.gamma(2.0, 10.0, 2 * WEEK)] for _ in range(2 * SERIES_PER_WORKER)]
    members = [Member.SEASONAL_NAIVE_DAY, Member.SEASONAL_NAIVE_WEEK]
    with LocalRunner(1, len(histories)) as here:
        expected = here.start(members, SMALL, histories, HORIZON)()
    with LocalRunner(2, len(histories)) as spawned:
        assert spawned.pool is not None
        forecasts = spawned.start(members, SMALL, histories, HORIZON)()
    np.testing.assert_array_equal(forecasts, expected)


# --- backtest on a slice of the real M4 file --------------------------------------------------


@pytest.fixture(scope="module")
def m4_slice(tmp_path_factory) -> Path:
    if not M4_TRAIN.is_file():
        pytest.skip(f"{M4_TRAIN} is not here")
    path = tmp_path_factory.mktemp("m4") / "Hourly-train.csv"
    pd.read_csv(M4_TRAIN, nrows=4).to_csv(path, index=False)
    return path


def test_backtest_writes_the_m4_format(m4_slice, tmp_path):
    output = tmp_path / "out" / "forecasts.csv"
    ensemble = run_backtest(
        m4_slice, HORIZON, output, workers=2, config=EnsembleConfig(forecasters=SMALL)
    )
    table = pd.read_csv(output)
    assert list(table.columns) == ["id"] + [f"F{i}" for i in range(1, HORIZON + 1)]
    assert table["id"].tolist() == ["H1", "H2", "H3", "H4"]
    assert np.isfinite(table.drop(columns="id").to_numpy()).all()
    np.testing.assert_allclose(table.drop(columns="id").to_numpy(), ensemble.forecasts)


def test_holdout_scores_every_model_against_naive2(m4_slice):
    report = holdout_report(m4_slice, HORIZON, limit=3, config=EnsembleConfig(forecasters=SMALL))
    assert (report["series"], report["horizon"]) == (3, HORIZON)
    scores = report["scores"]
    expected = {"ensemble", "seasonal_naive", "prophet_default", "naive2"}
    assert expected | {m.value for m in EnsembleConfig().members} == set(scores)
    assert scores["naive2"]["owa"] == pytest.approx(1.0)
    for name, values in scores.items():
        assert {"owa", "smape", "mase", "direction_accuracy"} <= set(values), name
        assert 0 <= values["direction_accuracy"] <= 1
    assert 0 <= scores["ensemble"]["coverage_80"] <= scores["ensemble"]["coverage_95"] <= 1


def test_backtest_names_a_bad_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("V1,V2\nH1,abc\n")
    with pytest.raises(DataError, match="non-numeric value 'abc'"):
        run_backtest(bad, HORIZON, tmp_path / "out.csv")
    with pytest.raises(DataError, match="file not found"):
        run_backtest(tmp_path / "missing.csv", HORIZON, tmp_path / "out.csv")
