"""AutoML per niche: a global study over every niche is the baseline and the warm start; each
niche's study starts from the global study's best trials, and its winner is registered as
`niche-<slug>` (challenger) and gated against the champion on the same time window.

Niches are YouTube categories and topics: clusters of the training titles' MiniLM embeddings
(`training.niche.explorer`), named by their distinctive words (`topic-trailer-official-hd`).
Both are listed in the niches table; categories are searched by default, a topic on request."""

from __future__ import annotations

import importlib.metadata
import tempfile
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

import joblib
import mlflow
import pandas as pd

from contentml import features, names, registry
from contentml.errors import UserError
from contentml.names import GLOBAL_NICHE
from contentml.settings import Settings
from feature_repo.niche_schema import FEATURES
from training import data
from training.niche.data import engagement_rows, time_split
from training.niche.explorer import assign_clusters, fit_title_clusters
from training.niche.search import SearchConfig, best_trials_params, fit_params, rmse, search

MODEL_CODE = Path(__file__).with_name("model_code.py")

TARGET = "log_views_gained"
"""What the niche models predict: log views gained from the first to the last trending day."""

VALIDATION_FRACTION = 0.2
"""The latest fifth of the snapshot days is the validation window (never a random split)."""

MIN_TRAIN_ROWS = 150
MIN_VALIDATION_ROWS = 30
"""A category is a niche with enough data when it has this many rows on each side."""

WARM_START_TRIALS = 3
"""Best global trials every niche study runs first."""

SEARCH_SHARE = 0.85
"""Share of the budget given to the studies; the rest is fitting, scoring, registering."""


class UnknownNiche(UserError):
    """A requested niche is not among the niches with enough data."""


class NicheKind(StrEnum):
    """What makes a niche: a YouTube category, or a cluster of similar titles (a topic)."""

    CATEGORY = "category"
    TOPIC = "topic"


TOPIC_CLUSTERS = 12
"""k-means clusters of training titles offered as topic niches: on the trending data, 12 gives
distinct topics (trailers, music videos, sports highlights, cooking, make-up, ...) of which
about 10 have enough data; 8 leaves a large mixed cluster."""


def niches_table(train: pd.DataFrame, validation: pd.DataFrame) -> pd.DataFrame:
    """Every category and topic (`NicheKind`, the frames' column of that name) with its rows
    on each side of the time split, and whether it has enough data for a model of its own."""
    parts = []
    for kind in NicheKind:
        counts = pd.DataFrame(
            {
                "train_rows": train[kind.value].value_counts(),
                "validation_rows": validation[kind.value].value_counts(),
            }
        )
        parts.append(counts.fillna(0).rename_axis("niche").reset_index().assign(kind=kind.value))
    table = pd.concat(parts, ignore_index=True).astype(
        {"train_rows": "int64", "validation_rows": "int64"}
    )
    table["slug"] = table["niche"].map(names.niche_slug)
    table["enough_data"] = (table["train_rows"] >= MIN_TRAIN_ROWS) & (
        table["validation_rows"] >= MIN_VALIDATION_ROWS
    )
    table = table.sort_values(["kind", "train_rows"], ascending=[True, False])
    table = table.reset_index(drop=True)
    return table[["niche", "kind", "slug", "train_rows", "validation_rows", "enough_data"]]


@dataclass(frozen=True)
class NicheResult:
    niche: str
    model: str
    train_rows: int
    validation_rows: int
    best_family: str
    validation_rmse: float
    global_rmse: float
    trials: int
    pruned: int
    version: str
    promoted: bool


class Split(NamedTuple):
    """The engagement rows both stages search on, split in time."""

    train: pd.DataFrame
    validation: pd.DataFrame


def prepare_split(settings: Settings) -> Split:
    """Publish the channel history to Feast; return the engagement rows with their channel
    history from Feast, split in time, each row with its title's topic."""
    videos = data.load_youtube_trending(settings.data_dir)
    features.publish_engagement_features(settings, videos)
    frame = features.engagement_training_frame(
        features.feature_store(settings), engagement_rows(videos)
    )
    train, validation = time_split(frame, VALIDATION_FRACTION)
    # Topics are found on the training days only, then every row gets its nearest topic.
    topics = fit_title_clusters(train["title"].tolist(), TOPIC_CLUSTERS)
    for part in (train, validation):
        part[NicheKind.TOPIC.value] = assign_clusters(topics, part["title"].tolist())
    return Split(train, validation)


def save_split(split: Split, folder: Path) -> None:
    """Write `split` for the niche stages, which then need neither Feast nor the encoder."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, frame in split._asdict().items():
        frame.to_parquet(folder / f"{part}.parquet")


def load_split(folder: Path) -> Split:
    return Split(*(pd.read_parquet(folder / f"{part}.parquet") for part in Split._fields))


def search_global(
    settings: Settings,
    split: Split,
    budget_minutes: float,
    niches: list[str] | None = None,
    seed: int = 0,
) -> dict:
    """The first stage: choose the niches, give each study its share of the budget, search
    and register the global model. The niche stages can then run in parallel."""
    train, validation = split
    table = niches_table(train, validation)
    chosen = _choose(table, niches)
    study_seconds = budget_minutes * 60 * SEARCH_SHARE / (len(chosen) + 1)
    config = SearchConfig(budget_seconds=study_seconds, max_trials=10_000, seed=seed)
    found = _study(settings, GLOBAL_NICHE, train, validation, config, enqueue=())
    model = fit_params(found["params"], train, FEATURES, TARGET, seed)
    version, _ = _register(settings, GLOBAL_NICHE, model, found, validation)
    return {
        "niches": chosen,
        "study_seconds": study_seconds,
        "validation_from": validation["event_timestamp"].min().isoformat(),
        "niches_table": table.to_dict(orient="records"),
        "global": {
            "model": names.niche_model_name(GLOBAL_NICHE),
            "best_family": found["family"],
            "validation_rmse": rmse(model, validation, FEATURES, TARGET),
            "trials": found["trials"],
            "version": version,
        },
    }


def search_niche(
    settings: Settings,
    split: Split,
    niche: str,
    study_seconds: float,
    global_version: str,
    seed: int = 0,
) -> dict:
    """One niche's stage: its study starts from the global study's best trials; the winner
    is registered, gated, and compared with global model `global_version` on the niche."""
    train, validation = split
    kind = _kind_of(niche, niches_table(train, validation))
    niche_train = train[train[kind] == niche]
    niche_validation = validation[validation[kind] == niche]
    warm = best_trials_params(settings.optuna_storage, _study_name(GLOBAL_NICHE), WARM_START_TRIALS)
    config = SearchConfig(budget_seconds=study_seconds, max_trials=10_000, seed=seed)
    found = _study(settings, names.niche_slug(niche), niche_train, niche_validation, config, warm)
    model = fit_params(found["params"], niche_train, FEATURES, TARGET, seed)
    version, gate = _register(settings, names.niche_slug(niche), model, found, niche_validation)
    global_model = mlflow.pyfunc.load_model(
        f"models:/{names.niche_model_name(GLOBAL_NICHE)}/{global_version}"
    )
    result = NicheResult(
        niche=niche,
        model=names.niche_model_name(niche),
        train_rows=len(niche_train),
        validation_rows=len(niche_validation),
        best_family=found["family"],
        validation_rmse=rmse(model, niche_validation, FEATURES, TARGET),
        global_rmse=rmse(
            global_model.unwrap_python_model().estimator, niche_validation, FEATURES, TARGET
        ),
        trials=found["trials"],
        pruned=found["pruned"],
        version=version,
        promoted=gate.promoted,
    )
    return asdict(result)


def run_automl(
    settings: Settings, budget_minutes: float, niches: list[str] | None = None, seed: int = 0
) -> dict:
    """Both stages in this process (`contentml niche automl`), within `budget_minutes`."""
    started = time.monotonic()
    split = prepare_split(settings)
    first = search_global(settings, split, budget_minutes, niches, seed)
    results = [
        search_niche(
            settings, split, name, first["study_seconds"], first["global"]["version"], seed
        )
        for name in first["niches"]
    ]
    beats = [r for r in results if r["validation_rmse"] < r["global_rmse"]]
    return {
        "target": TARGET,
        "validation_from": first["validation_from"],
        "global": first["global"],
        "niches": results,
        "niches_beating_global": f"{len(beats)}/{len(results)}",
        "niches_table": first["niches_table"],
        "seconds": round(time.monotonic() - started, 1),
    }


def _choose(table: pd.DataFrame, requested: list[str] | None) -> list[str]:
    """The niches to search: every category with enough data by default; by name or slug,
    any category or topic with enough data."""
    eligible = table[table["enough_data"]]
    if requested is None:
        return eligible[eligible["kind"] == NicheKind.CATEGORY.value]["niche"].tolist()
    by_key = dict(zip(eligible["slug"], eligible["niche"], strict=True))
    by_key |= {n: n for n in eligible["niche"]}
    unknown = [n for n in requested if n not in by_key]
    if unknown:
        raise UnknownNiche(
            f"no niche with enough data named {unknown}; choose from {eligible['slug'].tolist()}"
        )
    return [by_key[n] for n in requested]


def _kind_of(niche: str, table: pd.DataFrame) -> str:
    """The frame column a niche's rows are selected by (`NicheKind`)."""
    (kind,) = table[table["niche"] == niche]["kind"].unique()
    return kind


def _study_name(niche_slug: str) -> str:
    return f"niche-{niche_slug}-{TARGET}"


def _study(
    settings: Settings,
    niche_slug: str,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    config: SearchConfig,
    enqueue: list[dict],
) -> dict:
    client = registry.connect(settings)
    result = search(
        train,
        validation,
        list(FEATURES),
        TARGET,
        study_name=_study_name(niche_slug),
        storage=settings.optuna_storage,
        config=config,
        enqueue=enqueue,
        mlflow_tracking_uri=settings.mlflow_tracking_uri,
        mlflow_experiment=client.get_experiment(registry.experiment_id(client, settings)).name,
    )
    return {
        "family": str(result.best_family),
        "params": result.best_params,
        "trials": result.trials_completed,
        "pruned": result.trials_pruned,
    }


def _register(
    settings: Settings, niche_slug: str, model, found: dict, validation: pd.DataFrame
) -> tuple[str, registry.GateDecision]:
    """Log and register the fitted winner as challenger; gate it on the validation window."""
    name = names.niche_model_name(niche_slug)
    client = registry.connect(settings)
    score = rmse(model, validation, FEATURES, TARGET)
    with (
        mlflow.start_run(
            experiment_id=registry.experiment_id(client, settings), run_name=f"{name}-winner"
        ),
        tempfile.TemporaryDirectory() as scratch,
    ):
        mlflow.log_params({"target": TARGET, **found["params"]})
        mlflow.log_metrics({"validation_rmse": score, "trials": found["trials"]})
        estimator = Path(scratch) / "estimator.joblib"
        joblib.dump(model, estimator)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"estimator": str(estimator)},
            registered_model_name=name,
            input_example=validation[list(FEATURES)].head(2),
            pip_requirements=[
                f"{p}=={importlib.metadata.version(p)}"
                for p in ("mlflow", "scikit-learn", "torch", "pandas", "joblib")
            ],
        )
    version = str(info.registered_model_version)
    registry.register_challenger(client, name, version, "niche automl")
    gate = registry.promotion_gate(
        client,
        name,
        version,
        metric="rmse",
        greater_is_better=False,
        challenger_score=score,
        score_champion=lambda uri: rmse(
            mlflow.pyfunc.load_model(uri).unwrap_python_model().estimator,
            validation,
            FEATURES,
            TARGET,
        ),
    )
    return version, gate
