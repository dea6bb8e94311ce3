"""One KServe ModelServer process hosting every model that has a champion, following the
registry: a promotion or rollback is served within seconds, without a restart."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from kserve import ModelServer
from kserve.model import BaseKServeModel
from kserve.model_server import app

from contentml.errors import UserError
from contentml.registry import RegistryError
from contentml.settings import Settings
from serving.cache import CacheConfig
from serving.channels import channels_router
from serving.niche_model import NicheRouter
from serving.prediction_log import PredictionLog, open_prediction_log
from serving.quality_model import QualityModel
from serving.revenue_model import RevenueModel, revenue_router
from serving.script_model import ScriptModel, openai_router
from serving.trend_model import TrendModel
from serving.versions import ServingOptions, VersionedModel, VersionWatcher

PREDICTORS: dict[str, type[VersionedModel] | type[NicheRouter] | type[RevenueModel]] = {
    "trend": TrendModel,
    "quality": QualityModel,
    "niche": NicheRouter,
    "script": ScriptModel,
    "revenue": RevenueModel,
}
"""Served model name -> the predictor class that serves it. With `niche`, every registered
`niche-<slug>` model is served too; `script` answers on the OpenAI routes (`/openai/v1/...`);
`revenue` (the RevenueOptimizer's bandits) needs no registered model, and takes rewards on
`/v1/experiments/...`."""

logger = logging.getLogger(__name__)


class NothingToServe(RegistryError):
    """No model could be loaded: nothing has been promoted to champion yet."""


def parse_canary(items: list[str]) -> dict[str, int]:
    """`["trend=10", ...]` (the CLI's `--canary`) -> `{"trend": 10}`."""
    canary = {}
    for item in items:
        name, sep, percent = item.partition("=")
        if not sep or not percent.strip().isdigit():
            raise UserError(f"--canary takes MODEL=PERCENT, e.g. trend=10, not {item!r}")
        canary[name.strip()] = int(percent)
    return canary


def load_models(
    settings: Settings,
    names: list[str] | None = None,
    canary: Mapping[str, int] | None = None,
    cache: CacheConfig | None = None,
    prediction_log: PredictionLog | None = None,
) -> list[BaseKServeModel]:
    """Load the champion (and, with a canary share, the challenger) of each named model; a
    model without a champion is skipped. `canary` maps a model name to the challenger's percent
    of its requests (`niche` applies to every niche model); `cache` is the prediction cache in
    front of trend, quality and the niche models, `prediction_log` where they log what they
    answered."""
    names = names or list(PREDICTORS)
    canary = dict(canary or {})
    unknown = sorted((set(names) | set(canary)) - set(PREDICTORS))
    if unknown:
        raise ValueError(f"no predictor for {', '.join(unknown)}; known: {', '.join(PREDICTORS)}")
    models = []
    for name in names:
        options = ServingOptions(
            canary_percent=canary.get(name, 0),
            cache=cache or CacheConfig(),
            prediction_log=prediction_log,
        )
        model = PREDICTORS[name](name, settings, options)
        try:
            model.load()
        except RegistryError as e:
            logger.warning("not serving %s: %s", name, e)
            continue
        models.append(model)
        if isinstance(model, NicheRouter):
            models.extend(model.niches.values())
    if not models:
        raise NothingToServe(
            "no model has a champion yet: run `contentml demo` or "
            "`contentml pipeline run training --local` first"
        )
    return models


def serve(
    settings: Settings,
    port: int,
    grpc_port: int | None = None,
    names: list[str] | None = None,
    *,
    canary: Mapping[str, int] | None = None,
) -> None:
    """Serve V1, V2 (Open Inference Protocol), OpenAI, `/v1/channels`, health and /metrics on
    `port` until stopped, reading the aliases every `settings.serving_poll_seconds` and
    swapping to the versions they name. Answered instances go to the prediction log
    (`settings.prediction_log`), written out when the server stops."""
    cache = CacheConfig(settings.prediction_cache)
    prediction_log = open_prediction_log(settings)
    models = load_models(settings, names, canary, cache, prediction_log)
    router = openai_router(models)
    if router is not None:
        # KServe's own OpenAI routes need vLLM (see serving/script_model.py); ours go on the
        # app KServe serves, which it imports by name when it starts.
        app.include_router(router)
    app.include_router(channels_router(settings))  # CrisisManager: anomalies and quarantine
    for model in models:
        if isinstance(model, RevenueModel):
            app.include_router(revenue_router(model))
    watcher = VersionWatcher(
        settings,
        [m for m in models if isinstance(m, VersionedModel)],
        settings.serving_poll_seconds,
    ).start()
    server = ModelServer(
        http_port=port, grpc_port=grpc_port or 0, enable_grpc=grpc_port is not None, workers=1
    )
    try:
        server.start(models)
    finally:
        watcher.stop()
        if prediction_log is not None:
            prediction_log.close()
