"""AutoML search per niche: Optuna picks a model family and its hyperparameters.

A trial suggests `family`, then that family's hyperparameters (names prefixed with the family,
so that two families' `min_samples_leaf` never share one distribution in the study). The score
is the RMSE on the caller's validation frame (split by time by the caller). Iterative learners
train in stages and report the validation RMSE after each stage, so the median pruner can stop
a trial that is worse than the median of earlier trials at the same stage: gradient boosting
grows trees with `warm_start`, the MLP trains a few epochs per stage. The median pools both
families' stages (stage k of either is "k stages of training"); Hyperband would pool them too
and needs a shared resource unit, while the median pruner needs nothing but the step index.

Studies live in an Optuna RDB storage (SQLite locally, PostgreSQL in the cluster), so a search
resumes where a previous one stopped, and a niche's study is warm-started by enqueueing the
global study's best trials (`best_trials_params`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import Ridge

from contentml import registry

GBM_STAGE_TREES = 25
"""Trees added per gradient boosting stage (one pruning report each)."""

MLP_STAGE_EPOCHS = 10
"""Epochs per MLP stage (one pruning report each)."""


class Family(StrEnum):
    """The model families a trial chooses from."""

    RIDGE = "ridge"
    GBM = "gbm"
    FOREST = "forest"
    MLP = "mlp"


@dataclass(frozen=True)
class SearchConfig:
    budget_seconds: float = 60.0
    """Wall clock for one `search` call (Optuna's `timeout`; a running trial finishes)."""

    max_trials: int = 50
    """Most trials one `search` call runs, enqueued warm-start trials included."""

    families: tuple[Family, ...] = tuple(Family)
    """Families the trials choose from; keep them fixed for a study (Optuna refuses a
    categorical whose choices change between trials of one study)."""

    seed: int = 0
    """Seed of the TPE sampler and of every model fit."""

    def __post_init__(self) -> None:
        if not (isinstance(self.budget_seconds, int | float) and self.budget_seconds > 0):
            raise ValueError(f"budget_seconds must be positive, not {self.budget_seconds!r}")
        if not (isinstance(self.max_trials, int) and self.max_trials >= 1):
            raise ValueError(f"max_trials must be an integer >= 1, not {self.max_trials!r}")
        if not self.families or len(set(self.families)) != len(self.families):
            raise ValueError(f"families must be non-empty and distinct, not {self.families!r}")
        try:
            object.__setattr__(self, "families", tuple(Family(f) for f in self.families))
        except ValueError as e:
            raise ValueError(f"families has an unknown family: {self.families!r}") from e
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, not {self.seed!r}")


@dataclass(frozen=True)
class SearchResult:
    best_family: Family
    """Family of the best completed trial of the study (all calls so far)."""

    best_params: dict[str, Any]
    """The best trial's params as Optuna stores them (`family` plus prefixed names); pass
    them to `fit_params`."""

    best_rmse: float
    """Validation RMSE of the best trial."""

    trials_completed: int
    """Completed trials in the study (all calls so far)."""

    trials_pruned: int
    """Pruned trials in the study (all calls so far)."""

    study_name: str


class MLPRegressor:
    """A small PyTorch MLP with sklearn's `fit`/`predict`; inputs and target standardised."""

    def __init__(
        self,
        hidden: int,
        layers: int,
        lr: float,
        weight_decay: float,
        epochs: int,
        seed: int = 0,
        batch_size: int = 64,
    ) -> None:
        self.hidden, self.layers, self.lr, self.weight_decay = hidden, layers, lr, weight_decay
        self.epochs, self.seed, self.batch_size = epochs, seed, batch_size

    def fit(self, x: np.ndarray, y: np.ndarray) -> MLPRegressor:
        for _ in self.fit_stages(x, y):
            pass
        return self

    def fit_stages(
        self, x: np.ndarray, y: np.ndarray, every: int = MLP_STAGE_EPOCHS
    ) -> Iterator[int]:
        """Train, yielding the stage number after each `every` epochs (and the last)."""
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        self.x_mean_, self.x_std_ = x.mean(axis=0), x.std(axis=0) + 1e-8
        self.y_mean_, self.y_std_ = float(y.mean()), float(y.std()) + 1e-8
        inputs = torch.as_tensor((x - self.x_mean_) / self.x_std_, dtype=torch.float32)
        targets = torch.as_tensor((y - self.y_mean_) / self.y_std_, dtype=torch.float32)
        widths = [x.shape[1]] + [self.hidden] * self.layers
        blocks = [
            m
            for a, b in zip(widths, widths[1:], strict=False)
            for m in (torch.nn.Linear(a, b), torch.nn.ReLU())
        ]
        self.net_ = torch.nn.Sequential(*blocks, torch.nn.Linear(widths[-1], 1))
        optimizer = torch.optim.Adam(
            self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        for epoch in range(1, self.epochs + 1):
            for batch in torch.randperm(len(inputs), generator=generator).split(self.batch_size):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(
                    self.net_(inputs[batch]).squeeze(1), targets[batch]
                )
                loss.backward()
                optimizer.step()
            if epoch % every == 0 or epoch == self.epochs:
                yield math.ceil(epoch / every) - 1

    def predict(self, x: np.ndarray) -> np.ndarray:
        inputs = torch.as_tensor((x - self.x_mean_) / self.x_std_, dtype=torch.float32)
        with torch.no_grad():
            return self.net_(inputs).squeeze(1).numpy() * self.y_std_ + self.y_mean_


def _suggest_ridge(trial: optuna.Trial) -> None:
    trial.suggest_float("ridge_alpha", 1e-4, 1e3, log=True)


def _suggest_gbm(trial: optuna.Trial) -> None:
    trial.suggest_float("gbm_learning_rate", 0.01, 0.3, log=True)
    trial.suggest_int("gbm_max_iter", 50, 300, step=GBM_STAGE_TREES)
    trial.suggest_int("gbm_max_leaf_nodes", 4, 63, log=True)
    trial.suggest_int("gbm_min_samples_leaf", 2, 50, log=True)
    trial.suggest_float("gbm_l2", 1e-6, 10.0, log=True)


def _suggest_forest(trial: optuna.Trial) -> None:
    trial.suggest_int("forest_n_estimators", 20, 200, log=True)
    trial.suggest_int("forest_max_depth", 2, 16)
    trial.suggest_int("forest_min_samples_leaf", 1, 20, log=True)


def _suggest_mlp(trial: optuna.Trial) -> None:
    trial.suggest_int("mlp_hidden", 8, 128, log=True)
    trial.suggest_int("mlp_layers", 1, 2)
    trial.suggest_float("mlp_lr", 1e-4, 3e-2, log=True)
    trial.suggest_float("mlp_weight_decay", 1e-6, 1e-2, log=True)
    trial.suggest_int("mlp_epochs", 10, 100, step=MLP_STAGE_EPOCHS)


def _build_ridge(p: dict[str, Any], seed: int) -> Ridge:
    return Ridge(alpha=p["ridge_alpha"])


def _build_gbm(p: dict[str, Any], seed: int) -> HistGradientBoostingRegressor:
    return HistGradientBoostingRegressor(
        learning_rate=p["gbm_learning_rate"],
        max_iter=p["gbm_max_iter"],
        max_leaf_nodes=p["gbm_max_leaf_nodes"],
        min_samples_leaf=p["gbm_min_samples_leaf"],
        l2_regularization=p["gbm_l2"],
        early_stopping=False,
        warm_start=True,
        random_state=seed,
    )


def _build_forest(p: dict[str, Any], seed: int) -> RandomForestRegressor:
    return RandomForestRegressor(
        n_estimators=p["forest_n_estimators"],
        max_depth=p["forest_max_depth"],
        min_samples_leaf=p["forest_min_samples_leaf"],
        n_jobs=1,
        random_state=seed,
    )


def _build_mlp(p: dict[str, Any], seed: int) -> MLPRegressor:
    return MLPRegressor(
        hidden=p["mlp_hidden"],
        layers=p["mlp_layers"],
        lr=p["mlp_lr"],
        weight_decay=p["mlp_weight_decay"],
        epochs=p["mlp_epochs"],
        seed=seed,
    )


def _fit_once(estimator: Any, x: np.ndarray, y: np.ndarray) -> Iterator[int]:
    estimator.fit(x, y)
    return iter(())


def _fit_gbm_stages(
    estimator: HistGradientBoostingRegressor, x: np.ndarray, y: np.ndarray
) -> Iterator[int]:
    total = estimator.max_iter
    for stage, trees in enumerate(range(GBM_STAGE_TREES, total + GBM_STAGE_TREES, GBM_STAGE_TREES)):
        estimator.set_params(max_iter=min(trees, total))
        estimator.fit(x, y)  # warm_start: adds the new trees to the fitted ones
        yield stage


def _fit_mlp_stages(estimator: MLPRegressor, x: np.ndarray, y: np.ndarray) -> Iterator[int]:
    return estimator.fit_stages(x, y)


@dataclass(frozen=True)
class _FamilySpec:
    suggest: Callable[[optuna.Trial], None]
    build: Callable[[dict[str, Any], int], Any]
    fit_stages: Callable[[Any, np.ndarray, np.ndarray], Iterator[int]]
    """Fits the estimator, yielding a stage number after each stage that may be pruned."""


# One row per family: what a trial suggests, how its params become a model, how it trains.
FAMILY_SPECS: dict[Family, _FamilySpec] = {
    Family.RIDGE: _FamilySpec(_suggest_ridge, _build_ridge, _fit_once),
    Family.GBM: _FamilySpec(_suggest_gbm, _build_gbm, _fit_gbm_stages),
    Family.FOREST: _FamilySpec(_suggest_forest, _build_forest, _fit_once),
    Family.MLP: _FamilySpec(_suggest_mlp, _build_mlp, _fit_mlp_stages),
}


def _arrays(
    frame: pd.DataFrame, features: Sequence[str], target: str
) -> tuple[np.ndarray, np.ndarray]:
    return frame[list(features)].to_numpy(np.float64), frame[target].to_numpy(np.float64)


def fit_params(
    params: dict[str, Any],
    train: pd.DataFrame,
    features: Sequence[str],
    target: str,
    seed: int = 0,
    on_stage: Callable[[int, Any], None] | None = None,
) -> Any:
    """Build the model that `params` (a trial's params) describe and fit it on `train`;
    `on_stage(stage, estimator)` runs after each stage of an iterative learner."""
    spec = FAMILY_SPECS[Family(params["family"])]
    estimator = spec.build(params, seed)
    x, y = _arrays(train, features, target)
    for stage in spec.fit_stages(estimator, x, y):
        if on_stage is not None:
            on_stage(stage, estimator)
    return estimator


def rmse(estimator: Any, frame: pd.DataFrame, features: Sequence[str], target: str) -> float:
    """Root mean squared error of `estimator` on `frame`."""
    x, y = _arrays(frame, features, target)
    return float(np.sqrt(np.mean((estimator.predict(x) - y) ** 2)))


def _objective(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    features: Sequence[str],
    target: str,
    config: SearchConfig,
) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        family = Family(trial.suggest_categorical("family", [str(f) for f in config.families]))
        FAMILY_SPECS[family].suggest(trial)

        def report(stage: int, estimator: Any) -> None:
            trial.report(rmse(estimator, validation, features, target), stage)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{family} pruned at stage {stage}")

        estimator = fit_params(trial.params, train, features, target, config.seed, on_stage=report)
        return rmse(estimator, validation, features, target)

    return objective


class _MLflowTrials:
    """Logs each finished trial as a child run of one parent run, through an explicit client.

    Used instead of `optuna_integration.mlflow.MLflowCallback`, which optuna-integration 4.9
    deprecated (a FutureWarning on every search) and which sets the process-wide tracking URI
    and experiment; this one also records pruned trials' last validation RMSE."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
        self.client, self.experiment_id, self.parent_run_id = client, experiment_id, parent_run_id

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            MLFLOW_RUN_NAME: f"{study.study_name}-{trial.number}",
            "optuna.study": study.study_name,
            "optuna.trial": str(trial.number),
            "optuna.state": trial.state.name,
        }
        run = self.client.create_run(self.experiment_id, tags=tags)
        metrics = []
        if trial.value is not None:
            metrics.append(Metric("rmse", trial.value, 0, 0))
        for stage, value in trial.intermediate_values.items():
            metrics.append(Metric("rmse_stage", value, 0, stage))
        params = [Param(k, str(v)) for k, v in trial.params.items()]
        self.client.log_batch(run.info.run_id, metrics=metrics, params=params)
        status = "FINISHED" if trial.state != optuna.trial.TrialState.FAIL else "FAILED"
        self.client.set_terminated(run.info.run_id, status)


def search(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    features: list[str],
    target: str,
    *,
    study_name: str,
    storage: str,
    config: SearchConfig,
    enqueue: Sequence[dict[str, Any]] = (),
    mlflow_tracking_uri: str | None = None,
    mlflow_experiment: str | None = None,
) -> SearchResult:
    """Create or resume the study `study_name` in `storage`, run the `enqueue`d params first
    (skipping any the study already holds), then TPE trials until the budget or `max_trials`;
    with an MLflow URI, every trial is a child run of one parent run named after the study."""
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="minimize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=config.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
    )
    for params in enqueue:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    objective = _objective(train, validation, features, target, config)
    optimize = dict(n_trials=config.max_trials, timeout=config.budget_seconds, gc_after_trial=False)
    if mlflow_tracking_uri is None:
        study.optimize(objective, **optimize)
    else:
        client = MlflowClient(mlflow_tracking_uri)
        experiment = registry.ensure_experiment(client, mlflow_experiment or "Default")
        parent = client.create_run(
            experiment, run_name=study_name, tags={"optuna.study": study_name}
        )
        try:
            study.optimize(
                objective,
                callbacks=[_MLflowTrials(client, experiment, parent.info.run_id)],
                **optimize,
            )
        except BaseException:
            client.set_terminated(parent.info.run_id, "FAILED")
            raise
        client.set_terminated(parent.info.run_id, "FINISHED")
    return _result(study)


def _result(study: optuna.Study) -> SearchResult:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    best = study.best_trial  # ValueError when no trial completed
    return SearchResult(
        best_family=Family(best.params["family"]),
        best_params=dict(best.params),
        best_rmse=float(best.value),
        trials_completed=states.count(optuna.trial.TrialState.COMPLETE),
        trials_pruned=states.count(optuna.trial.TrialState.PRUNED),
        study_name=study.study_name,
    )


def best_trials_params(storage: str, study_name: str, k: int) -> list[dict[str, Any]]:
    """Params of the `k` best completed trials of a study, best first (for `enqueue`)."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [dict(t.params) for t in sorted(completed, key=lambda t: t.value)[:k]]
