"""The trend ensemble: forecasters combined per series by rolling-origin validation.

Fitting holds out the last `validation_origins` horizons of every series, forecasts each of
them with every member (global members trained only on data before the first held-out hour),
and weighs the members by their validation errors: a share of every series' weights comes from
the weights best across all series, the rest from the series' own errors. Prediction intervals
are empirical quantiles, per horizon step, of the validation errors of the shared-weight mix in
units of each series' MASE scale.
Then every member forecasts from the whole history; those forecasts are what `forecast_known`
serves. `forecast_history` forecasts an unseen history with the fast members only.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from contentml.runtime import one_native_thread
from training.trend import metrics
from training.trend.forecasters import (
    MEMBER_KINDS,
    MIN_HISTORY,
    Forecaster,
    ForecasterConfig,
    ForecastInputError,
    Member,
    build_forecaster,
    check_history,
)
from training.trend.model import UnknownSeries

DEFAULT_MEMBERS = (
    Member.SEASONAL_NAIVE_DAY,
    Member.SEASONAL_NAIVE_WEEK,
    Member.MSTL_ETS,
    Member.GLOBAL_BOOSTING,
    Member.GLOBAL_MLP,
)
"""Prophet is left out: it validates far below the others (OWA ~0.8) at a Stan fit per origin."""

INTERVAL_QUANTILES = (0.025, 0.1, 0.9, 0.975)
"""Lower 95 %, lower 80 %, upper 80 %, upper 95 % bounds, in this order."""

FORMAT_VERSION = 1
"""Version of the saved folder layout; `load_ensemble` refuses others."""


@dataclass(frozen=True)
class EnsembleConfig:
    horizon: int = 48
    """Hours forecast; requests may ask for fewer."""

    members: tuple[Member, ...] = DEFAULT_MEMBERS
    """Forecasters combined; at least one must be fast (it serves unseen histories)."""

    validation_origins: int = 2
    """Held-out horizons at the end of each series that weights and intervals are chosen on."""

    temperature: float = 0.2
    """Softness of per-series weights: a member whose validation loss is (1 + t) times the
    series' best gets e^-1 of the best member's weight."""

    global_share: float = 0.5
    """Share of each series' weights taken from the weights best across all series; two
    validation horizons are too few to trust a series' own errors alone."""

    forecasters: ForecasterConfig = field(default_factory=ForecasterConfig)
    """Settings of the individual forecasters."""

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ValueError(f"horizon must be at least 1, not {self.horizon}")
        if not self.members or len(set(self.members)) != len(self.members):
            raise ValueError("members must name at least one forecaster, each once")
        unknown = [m for m in self.members if not isinstance(m, Member)]
        if unknown:
            raise ValueError(f"unknown members {unknown}; choose from {[m.value for m in Member]}")
        if not any(MEMBER_KINDS[m].fast for m in self.members):
            raise ValueError("members need at least one fast forecaster to serve unseen histories")
        if self.validation_origins < 1:
            raise ValueError("validation_origins must be at least 1")
        if not self.temperature > 0:
            raise ValueError("temperature must be positive")
        if not 0 <= self.global_share <= 1:
            raise ValueError("global_share must be between 0 and 1")
        if not isinstance(self.forecasters, ForecasterConfig):
            raise ValueError("forecasters must be a ForecasterConfig")

    @property
    def min_series_length(self) -> int:
        """Shortest series `fit` accepts: a minimal history before the first held-out hour."""
        return MIN_HISTORY + self.validation_origins * self.horizon

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values; `from_dict` reads them back."""
        return {
            "horizon": self.horizon,
            "members": [m.value for m in self.members],
            "validation_origins": self.validation_origins,
            "temperature": self.temperature,
            "global_share": self.global_share,
            "forecasters": self.forecasters.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnsembleConfig:
        return cls(
            **{
                **data,
                "members": tuple(Member(m) for m in data["members"]),
                "forecasters": ForecasterConfig.from_dict(data["forecasters"]),
            }
        )


@dataclass(frozen=True)
class Forecast:
    """A point forecast with nested 80 % and 95 % prediction intervals."""

    point: np.ndarray
    lower_80: np.ndarray
    upper_80: np.ndarray
    lower_95: np.ndarray
    upper_95: np.ndarray
    direction: int
    """+1 when the forecast's mean is above the mean of as many last hours of history."""


def _forecast_locally(
    members: Sequence[Member],
    config: ForecasterConfig,
    histories: Sequence[Sequence[np.ndarray]],
    horizon: int,
) -> np.ndarray:
    """Forecasts of local members from the same number of histories for every series.

    Shape (series, member, history, step). Runs in worker processes.
    """
    forecasts = np.empty((len(histories), len(members), len(histories[0]), horizon))
    for index, member in enumerate(members):
        forecaster = build_forecaster(member, config)
        for row, cuts in enumerate(histories):
            forecasts[row, index] = forecaster.forecast_many(cuts, horizon)
    return forecasts


SERIES_PER_WORKER = 8
"""Fewest series worth a spawned worker. One spends about 3 s importing the forecasters, while
this process fits the default local members of a series in about 0.5 s: a small run is done
here before workers would have started."""


class LocalRunner:
    """Fits local members per series, in worker processes, or in this one when there is one
    worker or too few series to pay for starting more (`SERIES_PER_WORKER`).

    Processes are spawned, not forked: the parent may already run OpenMP threads (boosting,
    torch), and a forked child of such a process can deadlock in OpenMP.
    """

    def __init__(self, workers: int, series: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.workers = min(workers, max(1, series // SERIES_PER_WORKER))
        """The processes used: no more than give each `SERIES_PER_WORKER` series."""
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalRunner:
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=one_native_thread,
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def start(
        self,
        members: Sequence[Member],
        config: ForecasterConfig,
        histories: Sequence[Sequence[np.ndarray]],
        horizon: int,
    ) -> Callable[[], np.ndarray]:
        """Start forecasting (see `_forecast_locally`); the returned call waits for the result.

        Starting first lets the caller train global models while the workers fit local ones.
        """
        if self.pool is None:
            return lambda: _forecast_locally(members, config, histories, horizon)
        # Several chunks per worker even out series that fit slower than others.
        size = max(1, math.ceil(len(histories) / (4 * self.workers)))
        futures = [
            self.pool.submit(_forecast_locally, members, config, histories[i : i + size], horizon)
            for i in range(0, len(histories), size)
        ]
        return lambda: np.concatenate([f.result() for f in futures])


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def _errors(actual: np.ndarray, forecast: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    """sMAPE and MASE of forecasts whose last axis is the step; `scale` has the other axes.

    Every series has the same number of steps, so the overall means are the per-series means
    averaged, as M4 averages them.
    """
    mase = float(np.mean(np.abs(actual - forecast) / np.asarray(scale)[..., None]))
    return metrics.smape(actual, forecast), mase


def _loss(
    actual: np.ndarray, forecast: np.ndarray, scale: np.ndarray, reference: tuple[float, float]
) -> float:
    """OWA-style loss: sMAPE and MASE relative to Naive2's (`reference`)."""
    return metrics.owa(*_errors(actual, forecast, scale), *reference)


def _best_weights(
    forecasts: np.ndarray, actual: np.ndarray, scale: np.ndarray, reference: tuple[float, float]
) -> np.ndarray:
    """Simplex weights over members (axis 0 of `forecasts`) minimising the loss of the mix."""
    if len(forecasts) == 1:
        return np.ones(1)

    def loss(logits: np.ndarray) -> float:
        return _loss(actual, np.tensordot(_softmax(logits), forecasts, 1), scale, reference)

    # Nelder-Mead: the loss is piecewise linear in the weights, with no useful gradient. The
    # first simplex steps one unit per logit; scipy's default steps from zero are too small.
    start = np.vstack([np.zeros(len(forecasts)), np.eye(len(forecasts))])
    result = minimize(
        loss,
        start[0],
        method="Nelder-Mead",
        options={"initial_simplex": start, "xatol": 1e-3, "fatol": 1e-6},
    )
    return _softmax(result.x)


def _series_losses(
    validation: np.ndarray, actual: np.ndarray, scale: np.ndarray, reference: tuple[float, float]
) -> np.ndarray:
    """Each member's loss on each series, averaged over the origins: (series, member)."""
    members, origins, series, _ = validation.shape
    losses = np.empty((series, members, origins))
    for s, m, k in np.ndindex(series, members, origins):
        losses[s, m, k] = _loss(actual[k, s], validation[m, k, s], scale[k, s], reference)
    return losses.mean(axis=2)


class TrendEnsemble:
    """Forecasters combined per series by validation, with prediction intervals."""

    def __init__(self, config: EnsembleConfig | None = None) -> None:
        self.config = config or EnsembleConfig()
        self.forecasters: dict[Member, Forecaster] = {}
        """The members, global ones fitted on every series' whole history."""
        self.series_ids: list[str] = []
        self.tails = np.empty((0, self.tail_length))
        """Last hours of each series: the direction's reference, and a cached forecast is
        current while the series still ends so."""
        self.weights = np.empty((0, len(self.config.members)))
        """Per series (rows) and member (columns, in `config.members` order); rows sum to 1."""
        self.global_weights = np.empty(0)
        """The weights best across all series."""
        self.fast_weights = np.empty(0)
        """Weights for unseen histories: best across all series among fast members only."""
        self.interval_quantiles = np.empty((len(INTERVAL_QUANTILES), 0))
        """Per `INTERVAL_QUANTILES` level and step: error quantile in units of MASE scale."""
        self.member_forecasts = np.empty((len(self.config.members), 0, 0))
        """Each member's forecast from each whole series: (member, series, step)."""
        self.forecasts = np.empty((0, 0))
        """The combined forecast of each series: (series, step)."""
        self.bounds = np.empty((len(INTERVAL_QUANTILES), 0, 0))
        """Interval bounds per `INTERVAL_QUANTILES` level: (level, series, step)."""

    @property
    def tail_length(self) -> int:
        """Hours kept from the end of each series: a horizon (for the direction), at least a day."""
        return max(self.config.horizon, metrics.SEASONALITY)

    def fit(self, series: Mapping[str, np.ndarray], workers: int = 1) -> TrendEnsemble:
        """Validate, weigh and forecast every series; `workers` processes fit local members."""
        config = self.config
        horizon, origins = config.horizon, config.validation_origins
        if not series:
            raise ForecastInputError("no series to fit")
        values = {}
        for series_id, history in series.items():
            try:
                values[series_id] = check_history(history)
            except ForecastInputError as e:
                raise ForecastInputError(f"series {series_id!r}: {e}") from e
            if len(values[series_id]) < config.min_series_length:
                raise ForecastInputError(
                    f"series {series_id!r} has {len(history)} values, fewer than the "
                    f"{config.min_series_length} needed ({MIN_HISTORY} of history before "
                    f"{origins} validation horizons of {horizon})"
                )
        # cuts[s][k]: series s up to validation origin k; the last one is the whole series.
        cuts = [
            [y[: len(y) - (origins - k) * horizon] for k in range(origins + 1)]
            for y in values.values()
        ]
        local = [m for m in config.members if not MEMBER_KINDS[m].is_global]
        forecasts = np.empty((len(config.members), origins + 1, len(cuts), horizon))
        # While worker processes hold the cores, boosting's OpenMP threads would only thrash.
        runner = LocalRunner(workers, len(cuts))
        with runner, threadpool_limits(1 if runner.workers > 1 else None):
            collect = runner.start(local, config.forecasters, cuts, horizon)
            for index, member in enumerate(config.members):
                if member in local:
                    self.forecasters[member] = build_forecaster(member, config.forecasters)
                else:
                    forecasts[index] = self._fit_global(member, cuts, horizon)
            local_forecasts = collect()
        for position, member in enumerate(local):
            forecasts[config.members.index(member)] = local_forecasts[:, position].swapaxes(0, 1)

        self.series_ids = list(values)
        self.tails = np.stack([y[-self.tail_length :] for y in values.values()])
        self._weigh(forecasts[:, :origins], cuts)
        self.member_forecasts = forecasts[:, origins]
        self.forecasts = np.einsum("sm,msh->sh", self.weights, self.member_forecasts)
        scales = np.array([metrics.mase_scale(y) for y in values.values()])
        self.bounds = self.forecasts + self.interval_quantiles[:, None, :] * scales[:, None]
        return self

    def _fit_global(self, member: Member, cuts: list[list[np.ndarray]], horizon: int) -> np.ndarray:
        """Validation forecasts from a model trained before the first origin, then the final
        forecast from one retrained on every whole series. Shape (origin, series, step)."""
        origins = self.config.validation_origins
        validating = build_forecaster(member, self.config.forecasters)
        validating.fit([c[0] for c in cuts], horizon)
        validation = [
            validating.forecast_many([c[k] for c in cuts], horizon) for k in range(origins)
        ]
        final = build_forecaster(member, self.config.forecasters)
        final.fit([c[-1] for c in cuts], horizon)
        self.forecasters[member] = final
        return np.stack([*validation, final.forecast_many([c[-1] for c in cuts], horizon)])

    def _weigh(self, validation: np.ndarray, cuts: list[list[np.ndarray]]) -> None:
        """Weights and interval quantiles from validation forecasts: (member, origin, series,
        step)."""
        config = self.config
        horizon, origins = config.horizon, config.validation_origins
        # Actuals of origin k are the first `horizon` hours after cut k: the start of cut k+1.
        actual = np.array(
            [[c[k + 1][len(c[k]) : len(c[k]) + horizon] for c in cuts] for k in range(origins)]
        )
        histories = [[c[k] for c in cuts] for k in range(origins)]
        scale = np.array([[metrics.mase_scale(h) for h in row] for row in histories])
        naive2 = np.array([[metrics.naive2(h, horizon) for h in row] for row in histories])
        reference = _errors(actual, naive2, scale)
        series_loss = _series_losses(validation, actual, scale, reference)
        self.global_weights = _best_weights(validation, actual, scale, reference)
        fast = np.array([MEMBER_KINDS[m].fast for m in config.members])
        self.fast_weights = np.zeros(len(config.members))
        self.fast_weights[fast] = _best_weights(validation[fast], actual, scale, reference)
        # A member's own weight falls with its loss relative to the series' best member.
        best = series_loss.min(axis=1, keepdims=True)
        relative = (series_loss + 1e-9) / (best + 1e-9)
        own = _softmax(-(relative - 1) / config.temperature)
        self.weights = config.global_share * self.global_weights + (1 - config.global_share) * own

        # Errors of the shared-weight mix: the per-series weights were chosen on these very
        # errors, so their own would understate the error of a forecast.
        combined = np.tensordot(self.global_weights, validation, 1)
        errors = ((actual - combined) / scale[..., None]).reshape(-1, horizon)
        quantiles = np.quantile(errors, INTERVAL_QUANTILES, axis=0)
        # Clip at zero so the point forecast always lies inside both intervals, even when the
        # validation errors lean to one side.
        self.interval_quantiles = np.concatenate(
            [np.minimum(quantiles[:2], 0), np.maximum(quantiles[2:], 0)]
        )

    def _forecast(self, point: np.ndarray, bounds: np.ndarray, history: np.ndarray) -> Forecast:
        lower_95, lower_80, upper_80, upper_95 = bounds
        return Forecast(
            point=point,
            lower_80=lower_80,
            upper_80=upper_80,
            lower_95=lower_95,
            upper_95=upper_95,
            direction=metrics.direction(history, point),
        )

    def _check_horizon(self, horizon: int) -> None:
        if not 1 <= horizon <= self.config.horizon:
            raise ForecastInputError(
                f"horizon must be between 1 and {self.config.horizon} (the fitted horizon), "
                f"not {horizon}"
            )

    def forecast_known(self, series_id: str, horizon: int) -> Forecast:
        """The forecast precomputed by `fit` for a series it was fitted on."""
        self._check_horizon(horizon)
        try:
            row = self.series_ids.index(series_id)
        except ValueError:
            raise UnknownSeries(f"the ensemble was not fitted on series {series_id!r}") from None
        return self._forecast(
            self.forecasts[row, :horizon],
            self.bounds[:, row, :horizon],
            self.tails[row],
        )

    def forecast_history(self, history: Sequence[float] | np.ndarray, horizon: int) -> Forecast:
        """Forecast an arbitrary history with the fast members, mixed by `fast_weights`."""
        self._check_horizon(horizon)
        values = check_history(history)
        point = sum(
            weight * self.forecasters[member].forecast(values, horizon)
            for member, weight in zip(self.config.members, self.fast_weights, strict=True)
            if weight > 0
        )
        bounds = point + self.interval_quantiles[:, :horizon] * metrics.mase_scale(values)
        return self._forecast(point, bounds, values)


_CONFIG_FILE = "ensemble.json"
_SERIES_FILE = "series.parquet"
_LEVEL_NAMES = ("lower_95", "lower_80", "upper_80", "upper_95")


def save_ensemble(ensemble: TrendEnsemble, directory: Path) -> Path:
    """Write a fitted ensemble into `directory` (created if missing); returns the directory.

    Layout: `ensemble.json` (configuration, shared weights, interval quantiles),
    `series.parquet` (per series: weights, combined forecast and bounds, each member's
    forecast, last day), plus each global member's own file (`global_boosting.joblib`,
    `global_mlp.npz`). MLflow can log the whole folder as one artifact.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    members = ensemble.config.members
    header = {
        "format": FORMAT_VERSION,
        "config": ensemble.config.to_dict(),
        "global_weights": ensemble.global_weights.tolist(),
        "fast_weights": ensemble.fast_weights.tolist(),
        "interval_quantiles": ensemble.interval_quantiles.tolist(),
    }
    (directory / _CONFIG_FILE).write_text(json.dumps(header, indent=2))
    columns: dict[str, Any] = {"series_id": ensemble.series_ids, "tail": list(ensemble.tails)}
    columns |= {f"weight_{m.value}": ensemble.weights[:, i] for i, m in enumerate(members)}
    columns["forecast"] = list(ensemble.forecasts)
    columns |= {name: list(ensemble.bounds[i]) for i, name in enumerate(_LEVEL_NAMES)}
    columns |= {
        f"forecast_{m.value}": list(ensemble.member_forecasts[i]) for i, m in enumerate(members)
    }
    pd.DataFrame(columns).to_parquet(directory / _SERIES_FILE, index=False)
    for forecaster in ensemble.forecasters.values():
        forecaster.save_state(directory)
    return directory


def load_ensemble(directory: Path) -> TrendEnsemble:
    """Read back a folder written by `save_ensemble`."""
    directory = Path(directory)
    header = json.loads((directory / _CONFIG_FILE).read_text())
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{directory}: saved format {header.get('format')!r}, expected {FORMAT_VERSION}"
        )
    table = pd.read_parquet(directory / _SERIES_FILE)
    ensemble = TrendEnsemble(EnsembleConfig.from_dict(header["config"]))
    members = ensemble.config.members
    ensemble.global_weights = np.array(header["global_weights"])
    ensemble.fast_weights = np.array(header["fast_weights"])
    ensemble.interval_quantiles = np.array(header["interval_quantiles"])
    ensemble.series_ids = table["series_id"].tolist()
    ensemble.tails = np.stack(table["tail"].to_numpy())
    ensemble.weights = table[[f"weight_{m.value}" for m in members]].to_numpy()
    ensemble.forecasts = np.stack(table["forecast"].to_numpy())
    ensemble.bounds = np.stack([np.stack(table[name].to_numpy()) for name in _LEVEL_NAMES])
    ensemble.member_forecasts = np.stack(
        [np.stack(table[f"forecast_{m.value}"].to_numpy()) for m in members]
    )
    for member in members:
        forecaster = build_forecaster(member, ensemble.config.forecasters)
        forecaster.load_state(directory)
        ensemble.forecasters[member] = forecaster
    return ensemble
