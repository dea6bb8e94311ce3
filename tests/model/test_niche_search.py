"""The niche AutoML search: every family learns, studies resume and warm-start from enqueued
params, bad iterative trials are pruned, trials are logged to MLflow, and the same search runs
against the real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from contentml.names import NameRefused
from tests.conftest import requires_postgres
from training.niche.search import (
    Family,
    SearchConfig,
    best_trials_params,
    fit_params,
    rmse,
    search,
)

FEATURES = [f"x{i}" for i in range(6)]
POSTGRES_STORAGE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

# A fixed, reasonable setting per family (what a trial would suggest).
FAMILY_PARAMS = {
    Family.RIDGE: {"family": "ridge", "ridge_alpha": 1.0},
    Family.GBM: {
        "family": "gbm",
        "gbm_learning_rate": 0.1,
        "gbm_max_iter": 100,
        "gbm_max_leaf_nodes": 15,
        "gbm_min_samples_leaf": 10,
        "gbm_l2": 1e-3,
    },
    Family.FOREST: {
        "family": "forest",
        "forest_n_estimators": 50,
        "forest_max_depth": 8,
        "forest_min_samples_leaf": 2,
    },
    Family.MLP: {
        "family": "mlp",
        "mlp_hidden": 32,
        "mlp_layers": 2,
        "mlp_lr": 3e-3,
        "mlp_weight_decay": 1e-5,
        "mlp_epochs": 40,
    },
}


@pytest.fixture(scope="module", autouse=True)
def single_thread(one_thread: None) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """600 hourly rows, a nonlinear target with noise, split by time (last quarter validates)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6))
    y = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] ** 2 + x[:, 4] + 0.8 * x[:, 5]
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["y"] = y + rng.normal(scale=0.1, size=600)
    frame["time"] = pd.date_range("2024-01-01", periods=600, freq="h")
    frame = frame.sort_values("time")
    return frame.iloc[:450], frame.iloc[450:]


def config(**overrides) -> SearchConfig:
    values = {"budget_seconds": 20.0, "max_trials": 3, "families": (Family.RIDGE, Family.GBM)}
    return SearchConfig(**{**values, **overrides})


@pytest.mark.parametrize("family", list(Family))
def test_every_family_beats_the_mean(frames, family: Family) -> None:
    train, validation = frames
    model = fit_params(FAMILY_PARAMS[family], train, FEATURES, "y", seed=0)
    baseline = float(np.sqrt(np.mean((validation["y"] - train["y"].mean()) ** 2)))
    assert rmse(model, validation, FEATURES, "y") < 0.8 * baseline


def test_search_finds_the_best_and_resumes(frames, tmp_path) -> None:
    train, validation = frames
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = search(
        train, validation, FEATURES, "y", study_name="niche-a", storage=storage, config=config()
    )
    assert first.trials_completed == 3
    assert first.study_name == "niche-a"
    assert first.best_family in (Family.RIDGE, Family.GBM)
    # The params rebuild the best model: refitting scores what the trial scored.
    refit = fit_params(first.best_params, train, FEATURES, "y", seed=0)
    assert rmse(refit, validation, FEATURES, "y") == pytest.approx(first.best_rmse, rel=1e-6)

    second = search(
        train, validation, FEATURES, "y", study_name="niche-a", storage=storage, config=config()
    )
    assert second.trials_completed + second.trials_pruned == 6
    assert second.best_rmse <= first.best_rmse


def test_enqueued_params_run_first(frames, tmp_path) -> None:
    train, validation = frames
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    warm = [FAMILY_PARAMS[Family.GBM], FAMILY_PARAMS[Family.RIDGE]]
    result = search(
        train,
        validation,
        FEATURES,
        "y",
        study_name="niche-b",
        storage=storage,
        config=config(),
        enqueue=warm,
    )
    trials = optuna.load_study(study_name="niche-b", storage=storage).trials
    assert [t.params for t in trials[:2]] == warm
    assert result.trials_completed == 3

    best = best_trials_params(storage, "niche-b", k=2)
    assert len(best) == 2
    assert best[0] == result.best_params
    values = {t.number: t.value for t in trials}
    ranked = sorted(values, key=values.get)
    assert best == [trials[n].params for n in ranked[:2]]


def test_bad_iterative_trials_are_pruned(frames, tmp_path) -> None:
    train, validation = frames
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    good = [{**FAMILY_PARAMS[Family.GBM], "gbm_max_leaf_nodes": n} for n in (8, 10, 12, 15, 20)]
    slow_gbm = {**FAMILY_PARAMS[Family.GBM], "gbm_learning_rate": 0.01}
    slow_mlp = {**FAMILY_PARAMS[Family.MLP], "mlp_lr": 1e-4, "mlp_epochs": 30}
    result = search(
        train,
        validation,
        FEATURES,
        "y",
        study_name="niche-c",
        storage=storage,
        config=config(max_trials=7, families=(Family.GBM, Family.MLP)),
        enqueue=[*good, slow_gbm, slow_mlp],
    )
    trials = optuna.load_study(study_name="niche-c", storage=storage).trials
    states = [t.state for t in trials]
    pruned = optuna.trial.TrialState.PRUNED
    assert states == [optuna.trial.TrialState.COMPLETE] * 5 + [pruned, pruned]
    # Pruned at the first stage after warm-up, not trained to the end.
    assert [max(t.intermediate_values) for t in trials[5:]] == [1, 1]
    assert (result.trials_completed, result.trials_pruned) == (5, 2)


def test_trials_are_child_runs_of_one_parent_run(frames, tmp_path) -> None:
    train, validation = frames
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    search(
        train,
        validation,
        FEATURES,
        "y",
        study_name="niche-d",
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        config=config(),
        mlflow_tracking_uri=tracking_uri,
        mlflow_experiment="niche-search",
    )
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("niche-search")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
    assert [p.info.run_name for p in parents] == ["niche-d"]
    assert len(children) == 3
    assert {c.data.tags[MLFLOW_PARENT_RUN_ID] for c in children} == {parents[0].info.run_id}
    assert all("rmse" in c.data.metrics and "family" in c.data.params for c in children)
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_hostile_experiment_name_is_refused_before_any_trial(frames, tmp_path) -> None:
    train, validation = frames
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(NameRefused, match=r"experiment name '\.\./x' is refused: .*'\.\.'"):
        search(
            train,
            validation,
            FEATURES,
            "y",
            study_name="niche-e",
            storage=storage,
            config=config(),
            mlflow_tracking_uri=tracking_uri,
            mlflow_experiment="../x",
        )
    assert MlflowClient(tracking_uri).get_experiment_by_name("../x") is None
    assert optuna.load_study(study_name="niche-e", storage=storage).trials == []


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"budget_seconds": 0}, "budget_seconds"),
        ({"max_trials": 0}, "max_trials"),
        ({"max_trials": 2.5}, "max_trials"),
        ({"families": ()}, "families"),
        ({"families": (Family.GBM, Family.GBM)}, "families"),
        ({"families": ("gbm", "xgboost")}, "families"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_rejects_bad_values(overrides, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        config(**overrides)


def test_config_accepts_family_names() -> None:
    assert config(families=("mlp", "ridge")).families == (Family.MLP, Family.RIDGE)


@requires_postgres
@pytest.mark.postgres
def test_search_on_postgres(frames) -> None:
    train, validation = frames
    name = f"niche-test-{uuid.uuid4().hex[:10]}"
    try:
        first = search(
            train,
            validation,
            FEATURES,
            "y",
            study_name=name,
            storage=POSTGRES_STORAGE,
            config=config(),
        )
        second = search(
            train,
            validation,
            FEATURES,
            "y",
            study_name=name,
            storage=POSTGRES_STORAGE,
            config=config(),
            enqueue=best_trials_params(POSTGRES_STORAGE, name, k=1),
        )
        assert first.trials_completed == 3
        assert second.trials_completed + second.trials_pruned == 6
        assert second.best_rmse <= first.best_rmse
    finally:
        optuna.delete_study(study_name=name, storage=POSTGRES_STORAGE)
