"""One KServe ModelServer process hosting every model that has a champion."""

from __future__ import annotations

import logging

from kserve import ModelServer
from kserve.model import BaseKServeModel
from kserve.model_server import app

from contentml.registry import RegistryError
from contentml.settings import Settings
from serving.niche_model import NicheRouter
from serving.quality_model import QualityModel
from serving.script_model import ScriptModel, openai_router
from serving.trend_model import TrendModel

PREDICTORS: dict[str, type[BaseKServeModel]] = {
    "trend": TrendModel,
    "quality": QualityModel,
    "niche": NicheRouter,
    "script": ScriptModel,
}
"""Served model name -> the predictor class that serves it. With `niche`, every registered
`niche-<slug>` model is served too; `script` answers on the OpenAI routes (`/openai/v1/...`)."""

logger = logging.getLogger(__name__)


class NothingToServe(RegistryError):
    """No model could be loaded: nothing has been promoted to champion yet."""


def load_models(settings: Settings, names: list[str] | None = None) -> list[BaseKServeModel]:
    """Load the champion of each named model; a model without a champion is skipped."""
    names = names or list(PREDICTORS)
    unknown = sorted(set(names) - set(PREDICTORS))
    if unknown:
        raise ValueError(f"no predictor for {', '.join(unknown)}; known: {', '.join(PREDICTORS)}")
    models = []
    for name in names:
        model = PREDICTORS[name](name, settings)
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
    settings: Settings, port: int, grpc_port: int | None = None, names: list[str] | None = None
) -> None:
    """Serve V1, V2 (Open Inference Protocol), OpenAI, health and /metrics on `port` until
    stopped."""
    models = load_models(settings, names)
    router = openai_router(models)
    if router is not None:
        # KServe's own OpenAI routes need vLLM (see serving/script_model.py); ours go on the
        # app KServe serves, which it imports by name when it starts.
        app.include_router(router)
    server = ModelServer(
        http_port=port, grpc_port=grpc_port or 0, enable_grpc=grpc_port is not None, workers=1
    )
    server.start(models)
