"""Model performance against late ground truth: the logged predictions
(`serving/model_server/prediction_log.py`) joined with the actual values by `request_id` and
`index`, scored per model, version and time window with each family's metric, and compared with
the metric logged when the version was registered.

| family | models | metric per window | logged at registration | better |
|---|---|---|---|---|
| trend | `trend` | sMAPE (mean over instances) | `smape` | lower |
| quality | `quality` | weighted F1 | `weighted_f1` | higher |
| niche | `niche-<slug>` | RMSE of `log_views_gained` | `validation_rmse` | lower |

Ground truth (`actual`): trend, the observed values of the forecast hours (a list; scored over
the hours both have, so a partly elapsed horizon already counts); quality, the label (class
code 0-2 or its name in `TOXICITY_CLASSES`); niche, the observed `log_views_gained`.
`performance_drop` turns a window's metric and the registered one into the relative drop
the retraining rule reads (0.05 = 5 % worse).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway
from sklearn.metrics import f1_score

from contentml import registry
from contentml.errors import UserError
from contentml.settings import Settings
from training.data import TOXICITY_CLASSES
from training.trend.metrics import smape

KEYS = ("request_id", "index")
"""What a prediction and its ground truth share: the request's id and the instance's position
in it (both logged with every prediction)."""


class PerformanceError(UserError):
    """Performance cannot be computed from the inputs as given."""


class Family(StrEnum):
    TREND = "trend"
    QUALITY = "quality"
    NICHE = "niche"


def _trend_smape(actuals: Sequence[Any], predicted: Sequence[Any]) -> float:
    scores = []
    for actual, forecast in zip(actuals, predicted, strict=True):
        steps = min(len(actual), len(forecast))
        scores.append(smape(np.asarray(actual[:steps], float), np.asarray(forecast[:steps], float)))
    return float(np.mean(scores))


def _quality_class(actual: Any) -> int:
    if isinstance(actual, str):
        if actual not in TOXICITY_CLASSES:
            raise PerformanceError(f"unknown quality label {actual!r}; known: {TOXICITY_CLASSES}")
        return TOXICITY_CLASSES.index(actual)
    return int(actual)


def _weighted_f1(actuals: Sequence[Any], predicted: Sequence[Any]) -> float:
    labels = [_quality_class(a) for a in actuals]
    return float(f1_score(labels, list(predicted), average="weighted", zero_division=0.0))


def _rmse(actuals: Sequence[Any], predicted: Sequence[Any]) -> float:
    errors = np.asarray(predicted, float) - np.asarray(actuals, float)
    return float(np.sqrt(np.mean(errors**2)))


@dataclass(frozen=True)
class FamilyMetric:
    name: str
    """The metric's name in results (`metric` column)."""
    registered: str
    """The metric the family's training runs log with each registered version."""
    greater_is_better: bool
    predicted: Callable[[dict[str, Any]], Any]
    """A logged answer -> the predicted value the metric reads."""
    score: Callable[[Sequence[Any], Sequence[Any]], float]
    """(actual values, predicted values) -> the metric."""


METRICS: dict[Family, FamilyMetric] = {
    Family.TREND: FamilyMetric("smape", "smape", False, lambda a: a["forecast"], _trend_smape),
    Family.QUALITY: FamilyMetric(
        "weighted_f1", "weighted_f1", True, lambda a: int(a["class"]), _weighted_f1
    ),
    Family.NICHE: FamilyMetric(
        "rmse", "validation_rmse", False, lambda a: float(a["log_views_gained"]), _rmse
    ),
}
"""Each family's metric, as its training pipeline scores it before registration."""


def family_of(model: str) -> Family:
    """The family of a served model name (`trend`, `quality`, `niche-<slug>`)."""
    if model.startswith("niche-"):
        return Family.NICHE
    try:
        return Family(model)
    except ValueError as e:
        raise PerformanceError(f"no performance metric for model {model!r}") from e


def join_ground_truth(predictions: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """The logged predictions that have ground truth, with its `actual` column. `truth` has
    `request_id`, `index` and `actual`; a key sent twice keeps the last value (a correction)."""
    missing = sorted({*KEYS, "actual"} - set(truth.columns))
    if missing:
        raise PerformanceError(f"ground truth lacks the columns {missing}")
    truth = truth[[*KEYS, "actual"]].drop_duplicates(list(KEYS), keep="last")
    truth = truth.astype({"request_id": str, "index": "int64"})
    predictions = predictions.astype({"request_id": str, "index": "int64"})
    return predictions.merge(truth, on=list(KEYS), how="inner", validate="many_to_one")


COLUMNS = ["model", "version", "window", "rows", "metric", "value"]


def rolling_performance(
    joined: pd.DataFrame, model_family: Family | str, window: str | pd.Timedelta = "1D"
) -> pd.DataFrame:
    """The family's metric per model, version and consecutive time window of `window` (a
    pandas frequency: `1h`, `1D`, `7D`) by when each prediction was answered. Columns:
    `model`, `version`, `window` (its start, UTC), `rows`, `metric`, `value`. Read `rows`
    before trusting `value`: a window with few labelled predictions is noisy."""
    spec = METRICS[Family(model_family)]
    if joined.empty:
        return pd.DataFrame(columns=COLUMNS)
    frame = joined.assign(
        predicted=[spec.predicted(json.loads(outputs)) for outputs in joined["outputs"]]
    )
    results = []
    grouper = pd.Grouper(key="timestamp", freq=window)
    for (model, version, start), group in frame.groupby(["model", "version", grouper]):
        if group.empty:
            continue
        value = spec.score(group["actual"].tolist(), group["predicted"].tolist())
        results.append((model, version, start, len(group), spec.name, value))
    return pd.DataFrame(results, columns=COLUMNS)


def registered_metric(client: MlflowClient, name: str, version: str) -> float:
    """The metric (`METRICS`) logged by the training run that registered `name` `version`."""
    spec = METRICS[family_of(name)]
    model_version = registry.model_version(client, name, version)
    if not model_version.run_id:
        raise PerformanceError(f"{name} v{version} was registered without a training run")
    logged = client.get_run(model_version.run_id).data.metrics
    if spec.registered not in logged:
        raise PerformanceError(
            f"the run that registered {name} v{version} logged no {spec.registered!r} "
            f"(it logged {sorted(logged)})"
        )
    return float(logged[spec.registered])


def performance_drop(current: float, registered: float, greater_is_better: bool) -> float:
    """How much worse `current` is than `registered`, relative to it: 0.05 = 5 % worse,
    negative = better. A registered 0 (a perfect error) makes any worse value infinitely so."""
    if math.isnan(current) or math.isnan(registered):
        raise PerformanceError(f"cannot compare {current} with {registered}")
    change = (current - registered) if greater_is_better else (registered - current)
    if registered == 0:
        return 0.0 if change == 0 else math.copysign(math.inf, -change)
    return -change / abs(registered)


def compare_with_registration(client: MlflowClient, performance: pd.DataFrame) -> pd.DataFrame:
    """`rolling_performance` with `registered` (each version's metric at registration) and
    `drop` (`performance_drop` of each window against it) columns."""
    keys = list(zip(performance["model"], performance["version"], strict=True))
    registered = {key: registered_metric(client, *key) for key in set(keys)}
    values = [registered[key] for key in keys]
    drops = [
        performance_drop(value, base, METRICS[family_of(model)].greater_is_better)
        for (model, _), value, base in zip(keys, performance["value"], values, strict=True)
    ]
    return performance.assign(registered=values, drop=drops)


PERFORMANCE_DROP = "contentml_model_performance_drop"
PERFORMANCE_DROP_HELP = "Relative drop of the model's metric against its registration"
"""Gauge pushed by `publish_drop`: relative drop of a model's metric on the last window
against its registration (0.05 = 5 % worse); the alert rules page on > 0.05."""


def publish_drop(settings: Settings, model: str, drop: float) -> bool:
    """Push a model's performance drop to `settings.pushgateway_url` (one series per model,
    replaced on each push); False when no Pushgateway is configured."""
    if not settings.pushgateway_url:
        return False
    registry = CollectorRegistry()
    gauge = Gauge(PERFORMANCE_DROP, PERFORMANCE_DROP_HELP, ["model"], registry=registry)
    gauge.labels(model).set(drop)
    push_to_gateway(
        settings.pushgateway_url,
        job="contentml-monitoring",
        grouping_key={"model": model},
        registry=registry,
    )
    return True
