"""Backtests on M4-format files: the forecasts our independent evaluation scores, and our own
holdout scores of the ensemble, its members and the reference forecasters."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from training.data import load_m4_hourly
from training.trend import metrics
from training.trend.ensemble import EnsembleConfig, LocalRunner, TrendEnsemble
from training.trend.forecasters import ForecasterConfig, Member
from training.trend.model import ProphetConfig


def read_m4_series(train_csv: Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """The series of an M4 wide CSV by id, in file order; `DataError` if the file is bad."""
    frame = load_m4_hourly(train_csv, limit)
    return {
        series_id: group["interest"].to_numpy()
        for series_id, group in frame.groupby("series_id", sort=False)
    }


def run_backtest(
    train_csv: Path,
    horizon: int,
    output_csv: Path,
    workers: int = 1,
    config: EnsembleConfig | None = None,
) -> TrendEnsemble:
    """Fit the ensemble on each whole series and write M4's format: `id`, then `F1..F<horizon>`.

    Returns the fitted ensemble (for `save_ensemble`).
    """
    series = read_m4_series(train_csv)
    config = dataclasses.replace(config or EnsembleConfig(), horizon=horizon)
    ensemble = TrendEnsemble(config).fit(series, workers)
    table = pd.DataFrame(ensemble.forecasts, columns=[f"F{i}" for i in range(1, horizon + 1)])
    table.insert(0, "id", ensemble.series_ids)
    output_csv = Path(output_csv)
    output_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output_csv, index=False)
    return ensemble


def default_prophet_config(longest: int) -> ProphetConfig:
    """Prophet as a user gets it out of the box: additive daily and weekly seasons fitted on
    the whole history (`longest` hours covers every series)."""
    return ProphetConfig(seasonality_mode="additive", fit_window=longest)


def _mean_errors(
    histories: list[np.ndarray], actuals: np.ndarray, forecasts: np.ndarray
) -> tuple[float, float]:
    """sMAPE and MASE, each averaged over the series."""
    triples = list(zip(histories, actuals, forecasts, strict=True))
    return (
        float(np.mean([metrics.smape(a, f) for _, a, f in triples])),
        float(np.mean([metrics.mase(h, a, f) for h, a, f in triples])),
    )


def _scores(
    histories: list[np.ndarray],
    actuals: np.ndarray,
    forecasts: np.ndarray,
    naive2: tuple[float, float],
) -> dict[str, float]:
    """OWA against the Naive2 errors `naive2`, sMAPE, MASE and direction accuracy."""
    smape, mase = _mean_errors(histories, actuals, forecasts)
    hits = [
        metrics.direction(h, f) == metrics.direction(h, a)
        for h, a, f in zip(histories, actuals, forecasts, strict=True)
    ]
    return {
        "owa": metrics.owa(smape, mase, *naive2),
        "smape": smape,
        "mase": mase,
        "direction_accuracy": float(np.mean(hits)),
    }


def holdout_report(
    train_csv: Path,
    horizon: int,
    workers: int = 1,
    limit: int | None = None,
    config: EnsembleConfig | None = None,
) -> dict:
    """`score_holdout` on the series of an M4 wide CSV (the first `limit` of them), as
    `contentml trend evaluate` prints it: the number of series and horizon, then each model's
    scores rounded to four decimals."""
    series = read_m4_series(train_csv, limit)
    scores = score_holdout(series, horizon, workers, config)
    return {
        "series": len(series),
        "horizon": horizon,
        "scores": {
            name: {metric: round(value, 4) for metric, value in values.items()}
            for name, values in scores.items()
        },
    }


def score_holdout(
    series: Mapping[str, np.ndarray],
    horizon: int,
    workers: int = 1,
    config: EnsembleConfig | None = None,
) -> dict[str, dict[str, float]]:
    """Hold out the last `horizon` hours of each series, fit on the rest, score the forecasts.

    Keys: `ensemble` (with `coverage_80`, `coverage_95` of its intervals and `fit_seconds`),
    each member by name, `seasonal_naive`, `prophet_default` (see `default_prophet_config`,
    with `fit_seconds`) and `naive2`. Each holds `owa`, `smape`, `mase`, `direction_accuracy`.
    """
    histories = [y[:-horizon] for y in series.values()]
    actuals = np.stack([y[-horizon:] for y in series.values()])
    naive2 = np.stack([metrics.naive2(h, horizon) for h in histories])
    reference = _mean_errors(histories, actuals, naive2)

    config = dataclasses.replace(config or EnsembleConfig(), horizon=horizon)
    started = time.monotonic()
    ensemble = TrendEnsemble(config).fit(dict(zip(series, histories, strict=True)), workers)
    ensemble_seconds = time.monotonic() - started

    started = time.monotonic()
    prophet = ForecasterConfig(prophet=default_prophet_config(max(len(h) for h in histories)))
    with LocalRunner(workers, len(histories)) as runner:
        prophet_forecasts = runner.start(
            [Member.PROPHET], prophet, [[h] for h in histories], horizon
        )()[:, 0, 0]
    prophet_seconds = time.monotonic() - started

    lower_95, lower_80, upper_80, upper_95 = ensemble.bounds
    results = {
        "ensemble": _scores(histories, actuals, ensemble.forecasts, reference)
        | {
            "coverage_80": float(np.mean((lower_80 <= actuals) & (actuals <= upper_80))),
            "coverage_95": float(np.mean((lower_95 <= actuals) & (actuals <= upper_95))),
            "fit_seconds": ensemble_seconds,
        },
    }
    for member, forecasts in zip(config.members, ensemble.member_forecasts, strict=True):
        results[member.value] = _scores(histories, actuals, forecasts, reference)
    seasonal_naive = np.stack([metrics.seasonal_naive(h, horizon) for h in histories])
    results["seasonal_naive"] = _scores(histories, actuals, seasonal_naive, reference)
    results["prophet_default"] = _scores(histories, actuals, prophet_forecasts, reference) | {
        "fit_seconds": prophet_seconds
    }
    results["naive2"] = _scores(histories, actuals, naive2, reference)
    return results
