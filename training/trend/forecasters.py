"""The trend model's forecasters, behind one interface: forecast `horizon` hours from a history.

Local forecasters (seasonal naive, MSTL + ETS, Prophet) fit each history on its own when asked.
Global forecasters (gradient boosting, an MLP) learn once from windows of every series, each
window divided by its last week's mean so that one model fits every scale; they then forecast
any history, including one they never saw. Histories carry no timestamps: daily and weekly
phases are read from the position of each value relative to the end of the history.
"""

from __future__ import annotations

import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from statsmodels.tools.sm_exceptions import ConvergenceWarning
from statsmodels.tsa.holtwinters import ExponentialSmoothing
from statsmodels.tsa.seasonal import MSTL

from contentml.errors import UserError
from training.trend.metrics import SEASONALITY
from training.trend.model import MIN_HISTORY, ProphetConfig, fit_forecast

WEEK = 7 * SEASONALITY
"""Hourly interest also repeats weekly (weekday against weekend)."""


class ForecastInputError(UserError):
    """A history, horizon or set of series that the forecasters cannot work with."""


def check_history(history: Sequence[float] | np.ndarray) -> np.ndarray:
    """The history as a float array, or `ForecastInputError` naming what is wrong with it."""
    values = np.asarray(history, dtype=float)
    if values.ndim != 1:
        raise ForecastInputError(f"a history must be one-dimensional, not shape {values.shape}")
    if len(values) < MIN_HISTORY:
        raise ForecastInputError(
            f"a history needs at least {MIN_HISTORY} hourly values, not {len(values)}"
        )
    if not np.isfinite(values).all():
        raise ForecastInputError("a history must hold finite numbers only")
    return values


def pad_history(history: np.ndarray, length: int) -> np.ndarray:
    """Extend a short history backwards to `length` by repeating its first whole days.

    Copies of whole days keep every value at its daily phase, so models that read daily lags
    still line up; weekly lags of a padded history only repeat the daily cycle.
    """
    if len(history) >= length:
        return history
    days = history[: SEASONALITY * (len(history) // SEASONALITY)]
    copies = math.ceil((length - len(history)) / len(days))
    return np.concatenate([np.tile(days, copies)[len(history) - length :], history])


class Forecaster(ABC):
    """Forecasts `horizon` hours from a history; global forecasters `fit` on all series first."""

    min_history: int = MIN_HISTORY
    """Shorter histories are padded to this length (see `pad_history`) before forecasting."""

    @abstractmethod
    def fit(self, series: Sequence[np.ndarray], horizon: int) -> None:
        """Learn from every series, to forecast up to `horizon` hours ahead."""

    @abstractmethod
    def forecast_many(self, histories: Sequence[np.ndarray], horizon: int) -> np.ndarray:
        """One row of `horizon` finite forecasts per history."""

    def forecast(self, history: np.ndarray, horizon: int) -> np.ndarray:
        """`horizon` finite forecasts following `history`."""
        return self.forecast_many([history], horizon)[0]

    @abstractmethod
    def save_state(self, directory: Path) -> list[Path]:
        """Write what `fit` learned into `directory`; returns the files written."""

    @abstractmethod
    def load_state(self, directory: Path) -> None:
        """Read back what `save_state` wrote."""


class LocalForecaster(Forecaster):
    """Fits each history on its own when forecasting: nothing is learned across series."""

    def fit(self, series: Sequence[np.ndarray], horizon: int) -> None:
        pass

    def forecast_many(self, histories: Sequence[np.ndarray], horizon: int) -> np.ndarray:
        padded = [pad_history(check_history(h), self.min_history) for h in histories]
        return np.array([self._forecast_one(h, horizon) for h in padded]).reshape(-1, horizon)

    @abstractmethod
    def _forecast_one(self, history: np.ndarray, horizon: int) -> np.ndarray:
        """Forecasts from one history at least `min_history` long."""

    def save_state(self, directory: Path) -> list[Path]:
        return []

    def load_state(self, directory: Path) -> None:
        pass


class SeasonalNaive(LocalForecaster):
    """Repeat the last cycle of `period` hours."""

    def __init__(self, period: int) -> None:
        self.period = period
        self.min_history = max(MIN_HISTORY, period)

    def _forecast_one(self, history: np.ndarray, horizon: int) -> np.ndarray:
        return np.resize(history[-self.period :], horizon)


@dataclass(frozen=True)
class MstlConfig:
    window: int = 4 * WEEK
    """Hours of recent history decomposed; older data slows MSTL and rarely helps at 48 h."""

    def __post_init__(self) -> None:
        if self.window < 2 * WEEK + 1:
            raise ValueError(f"MSTL window must exceed two weeks ({2 * WEEK} hours)")


class MstlEts(LocalForecaster):
    """MSTL removes the daily and weekly seasons; a damped-trend ETS forecasts what is left.

    Positive series are decomposed in logs, so seasons scale with the level. The seasons are
    continued by repeating their last cycle.
    """

    min_history = 2 * WEEK + 1

    def __init__(self, config: MstlConfig) -> None:
        self.config = config

    def _forecast_one(self, history: np.ndarray, horizon: int) -> np.ndarray:
        window = history[-self.config.window :]
        positive = bool(np.all(window > 0))
        values = np.log(window) if positive else window
        seasonal = (
            MSTL(values, periods=(SEASONALITY, WEEK), stl_kwargs={"seasonal_deg": 0}).fit().seasonal
        )
        future_seasonal = np.resize(seasonal[-SEASONALITY:, 0], horizon) + np.resize(
            seasonal[-WEEK:, 1], horizon
        )
        with warnings.catch_warnings():
            # The optimiser often stops at its iteration cap on flat remainders; the
            # parameters it reached still forecast well (the ensemble weighs the result).
            warnings.simplefilter("ignore", ConvergenceWarning)
            level = ExponentialSmoothing(
                values - seasonal.sum(axis=1), trend="add", damped_trend=True
            ).fit()
        forecast = level.forecast(horizon) + future_seasonal
        return np.exp(forecast) if positive else forecast


class ProphetForecaster(LocalForecaster):
    """Prophet on the recent history (see `training.trend.model.fit_forecast`)."""

    def __init__(self, config: ProphetConfig) -> None:
        self.config = config
        # cmdstanpy logs every fit at INFO (hundreds of lines per backtest), and on first use
        # turns its logger up to DEBUG unless that logger already has a handler.
        stan_logger = logging.getLogger("cmdstanpy")
        if not stan_logger.handlers:
            stan_logger.addHandler(logging.NullHandler())
        stan_logger.setLevel(logging.WARNING)

    def _forecast_one(self, history: np.ndarray, horizon: int) -> np.ndarray:
        return fit_forecast(history, horizon, self.config)


def _windows(series: Sequence[np.ndarray], input_length: int, horizon: int) -> np.ndarray:
    """Every (input + horizon) window of every series, each divided by its input's last week.

    Series too short for one window contribute none.
    """
    size = input_length + horizon
    blocks = [
        np.lib.stride_tricks.sliding_window_view(values, size)
        for values in series
        if len(values) >= size
    ]
    if not blocks:
        raise ForecastInputError(
            f"no series is long enough to train a global model: each needs at least "
            f"{size} values ({input_length} of input and {horizon} to learn from)"
        )
    # Single precision halves the memory of ~10^5 windows; the models train in it anyway.
    windows = np.concatenate(blocks).astype(np.float32)
    return windows / _level(windows[:, :input_length])


def _level(inputs: np.ndarray) -> np.ndarray:
    """Each row's mean over its last week: the scale a global model works in.

    A row with a zero level keeps scale 1, so a flat-zero series forecasts zeros.
    """
    level = inputs[:, -WEEK:].mean(axis=1, keepdims=True)
    return np.where(level == 0, 1.0, level)


class GlobalForecaster(Forecaster):
    """Learns from windows of every series; forecasts any history from its last hours."""

    def __init__(self, input_length: int) -> None:
        self.min_history = input_length
        self.horizon = 0
        """The horizon it was fitted for; 0 until fitted."""

    def _inputs(self, histories: Sequence[np.ndarray], horizon: int) -> np.ndarray:
        """The last `min_history` hours of each history (padded when shorter), one per row."""
        if self.horizon == 0:
            raise ForecastInputError(f"{type(self).__name__} must be fitted before forecasting")
        if not 1 <= horizon <= self.horizon:
            raise ForecastInputError(
                f"horizon must be between 1 and {self.horizon} (the fitted horizon), not {horizon}"
            )
        length = self.min_history
        return np.stack([pad_history(check_history(h), length)[-length:] for h in histories])


@dataclass(frozen=True)
class BoostingConfig:
    input_length: int = 2 * WEEK
    """Hours of history each forecast reads; two weeks give two same-hour-of-week values."""

    recent_lags: int = 2 * SEASONALITY
    """The most recent hours given to the model one by one."""

    samples_per_window: int = 6
    """Training rows drawn per window (each row one window and one random horizon step)."""

    max_iter: int = 500
    """Boosting rounds."""

    learning_rate: float = 0.1
    """Shrinkage of each round."""

    max_leaf_nodes: int = 63
    """Leaves per tree."""

    min_samples_leaf: int = 50
    """Rows a leaf needs; larger smooths the forecast."""

    seed: int = 0
    """Seed of the row sampling."""

    def __post_init__(self) -> None:
        if self.input_length < 2 * WEEK:
            raise ValueError(f"input_length must be at least two weeks ({2 * WEEK} hours)")
        if not 1 <= self.recent_lags <= self.input_length:
            raise ValueError("recent_lags must be between 1 and input_length")
        for name in ("samples_per_window", "max_iter", "max_leaf_nodes", "min_samples_leaf"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 < self.learning_rate <= 1:
            raise ValueError("learning_rate must be in (0, 1]")


DAYS_BACK = 3
"""Same-hour-of-day values given for each target hour: the last three days."""

WEEKS_BACK = 2
"""Same-hour-of-week values given for each target hour: the last two weeks."""


def _boosting_features(
    inputs: np.ndarray, rows: np.ndarray, steps: np.ndarray, recent_lags: int
) -> np.ndarray:
    """Features for target `steps` (1 = the next hour) after the normalised windows `inputs[rows]`.

    Besides the recent hours, each row gets the inputs at the same hour of day and of week as
    its target: trees cannot look up a lag by the horizon themselves. Rows index `inputs`
    rather than copy it: training draws several rows per window.
    """
    length = inputs.shape[1]
    offset = steps - 1
    aligned = [
        inputs[rows, length - period * (back + 1) + offset % period]
        for period, count in ((SEASONALITY, DAYS_BACK), (WEEK, WEEKS_BACK))
        for back in range(count)
    ]
    summary = np.column_stack(
        [
            inputs[:, -SEASONALITY:].mean(axis=1),
            inputs[:, -WEEK:].std(axis=1),
            inputs[:, :WEEK].mean(axis=1),
        ]
    )
    return np.column_stack([inputs[rows, -recent_lags:], steps, *aligned, summary[rows]]).astype(
        np.float32
    )


class GlobalBoosting(GlobalForecaster):
    """One gradient-boosted model for every series and horizon step (the step is a feature).

    Trained with absolute error on values divided by the last week's mean: MASE and sMAPE are
    absolute-error metrics, and the normalisation lets one model serve every scale.
    """

    def __init__(self, config: BoostingConfig) -> None:
        super().__init__(config.input_length)
        self.config = config
        self.model: HistGradientBoostingRegressor | None = None

    def fit(self, series: Sequence[np.ndarray], horizon: int) -> None:
        config = self.config
        windows = _windows(series, config.input_length, horizon)
        rng = np.random.default_rng(config.seed)
        count = len(windows) * config.samples_per_window
        picked = rng.integers(0, len(windows), count)
        steps = rng.integers(1, horizon + 1, count)
        features = _boosting_features(
            windows[:, : config.input_length], picked, steps, config.recent_lags
        )
        targets = windows[picked, config.input_length + steps - 1]
        self.model = HistGradientBoostingRegressor(
            loss="absolute_error",
            max_iter=config.max_iter,
            learning_rate=config.learning_rate,
            max_leaf_nodes=config.max_leaf_nodes,
            min_samples_leaf=config.min_samples_leaf,
            early_stopping=False,
            random_state=config.seed,
        ).fit(features, targets)
        self.horizon = horizon

    def forecast_many(self, histories: Sequence[np.ndarray], horizon: int) -> np.ndarray:
        inputs = self._inputs(histories, horizon)
        level = _level(inputs)
        rows = np.repeat(np.arange(len(inputs)), horizon)
        steps = np.tile(np.arange(1, horizon + 1), len(inputs))
        features = _boosting_features(inputs / level, rows, steps, self.config.recent_lags)
        return self.model.predict(features).reshape(len(inputs), horizon) * level

    def save_state(self, directory: Path) -> list[Path]:
        path = directory / "global_boosting.joblib"
        joblib.dump({"model": self.model, "horizon": self.horizon}, path)
        return [path]

    def load_state(self, directory: Path) -> None:
        state = joblib.load(directory / "global_boosting.joblib")
        self.model, self.horizon = state["model"], state["horizon"]


@dataclass(frozen=True)
class MlpConfig:
    input_length: int = 2 * WEEK
    """Hours of history each forecast reads."""

    hidden: int = 512
    """Units in each of the two hidden layers."""

    epochs: int = 8
    """Passes over every training window."""

    batch_size: int = 1024
    """Windows per optimiser step."""

    learning_rate: float = 2e-3
    """Peak of the one-cycle learning-rate schedule."""

    seed: int = 0
    """Seed of initialisation and batch order."""

    def __post_init__(self) -> None:
        if self.input_length < WEEK:
            raise ValueError(f"input_length must be at least a week ({WEEK} hours)")
        for name in ("hidden", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be positive")


class GlobalMlp(GlobalForecaster):
    """A two-hidden-layer MLP mapping a normalised window to all horizon steps at once.

    It learns the deviation from the last week's level (input and output minus 1) with absolute
    error. Torch trains it; forecasting runs the three layers in numpy, so serving needs no
    torch and a forecast costs microseconds.
    """

    def __init__(self, config: MlpConfig) -> None:
        super().__init__(config.input_length)
        self.config = config
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []

    def fit(self, series: Sequence[np.ndarray], horizon: int) -> None:
        import torch  # Imported here: only training needs it, serving runs the numpy forward.

        config = self.config
        windows = torch.from_numpy(_windows(series, config.input_length, horizon) - 1)
        inputs, targets = windows[:, : config.input_length], windows[:, config.input_length :]
        generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        network = torch.nn.Sequential(
            torch.nn.Linear(config.input_length, config.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(config.hidden, config.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(config.hidden, horizon),
        )
        optimiser = torch.optim.Adam(network.parameters())
        batches = max(1, len(inputs) // config.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, config.learning_rate, total_steps=config.epochs * batches
        )
        for _ in range(config.epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for batch in range(batches):
                rows = order[batch * config.batch_size : (batch + 1) * config.batch_size]
                loss = (network(inputs[rows]) - targets[rows]).abs().mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
        linear = [m for m in network if isinstance(m, torch.nn.Linear)]
        self.layers = [
            (m.weight.detach().numpy().T.copy(), m.bias.detach().numpy()) for m in linear
        ]
        self.horizon = horizon

    def forecast_many(self, histories: Sequence[np.ndarray], horizon: int) -> np.ndarray:
        inputs = self._inputs(histories, horizon)
        level = _level(inputs)
        hidden = (inputs / level - 1).astype(np.float32)
        for index, (weight, bias) in enumerate(self.layers):
            hidden = hidden @ weight + bias
            if index < len(self.layers) - 1:
                hidden = np.maximum(hidden, 0)
        return (hidden[:, :horizon] + 1) * level

    def save_state(self, directory: Path) -> list[Path]:
        path = directory / "global_mlp.npz"
        arrays = {f"weight{i}": w for i, (w, _) in enumerate(self.layers)}
        arrays |= {f"bias{i}": b for i, (_, b) in enumerate(self.layers)}
        np.savez(path, horizon=self.horizon, **arrays)
        return [path]

    def load_state(self, directory: Path) -> None:
        with np.load(directory / "global_mlp.npz") as state:
            count = sum(name.startswith("weight") for name in state.files)
            self.layers = [(state[f"weight{i}"], state[f"bias{i}"]) for i in range(count)]
            self.horizon = int(state["horizon"])


@dataclass(frozen=True)
class ForecasterConfig:
    boosting: BoostingConfig = field(default_factory=BoostingConfig)
    """The global gradient-boosting model."""

    mlp: MlpConfig = field(default_factory=MlpConfig)
    """The global MLP."""

    mstl: MstlConfig = field(default_factory=MstlConfig)
    """The MSTL + ETS model."""

    prophet: ProphetConfig = field(default_factory=ProphetConfig)
    """Prophet as an ensemble member."""

    def __post_init__(self) -> None:
        for name, kind in (
            ("boosting", BoostingConfig),
            ("mlp", MlpConfig),
            ("mstl", MstlConfig),
            ("prophet", ProphetConfig),
        ):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values; `from_dict` reads them back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForecasterConfig:
        return cls(
            boosting=BoostingConfig(**data["boosting"]),
            mlp=MlpConfig(**data["mlp"]),
            mstl=MstlConfig(**data["mstl"]),
            prophet=ProphetConfig(**data["prophet"]),
        )


class Member(StrEnum):
    """The forecasters an ensemble can combine."""

    SEASONAL_NAIVE_DAY = "seasonal_naive_day"
    SEASONAL_NAIVE_WEEK = "seasonal_naive_week"
    MSTL_ETS = "mstl_ets"
    PROPHET = "prophet"
    GLOBAL_BOOSTING = "global_boosting"
    GLOBAL_MLP = "global_mlp"


@dataclass(frozen=True)
class MemberKind:
    build: Callable[[ForecasterConfig], Forecaster]
    """Makes the (unfitted) forecaster from the configuration."""

    is_global: bool
    """Trained once across all series (else fitted per history when forecasting)."""

    fast: bool
    """Cheap enough to run on a serving request (well under 500 ms on one core)."""


MEMBER_KINDS: dict[Member, MemberKind] = {
    Member.SEASONAL_NAIVE_DAY: MemberKind(lambda c: SeasonalNaive(SEASONALITY), False, True),
    Member.SEASONAL_NAIVE_WEEK: MemberKind(lambda c: SeasonalNaive(WEEK), False, True),
    Member.MSTL_ETS: MemberKind(lambda c: MstlEts(c.mstl), False, False),
    Member.PROPHET: MemberKind(lambda c: ProphetForecaster(c.prophet), False, False),
    Member.GLOBAL_BOOSTING: MemberKind(lambda c: GlobalBoosting(c.boosting), True, True),
    Member.GLOBAL_MLP: MemberKind(lambda c: GlobalMlp(c.mlp), True, True),
}


def build_forecaster(member: Member, config: ForecasterConfig) -> Forecaster:
    """The unfitted forecaster for `member`."""
    return MEMBER_KINDS[member].build(config)
