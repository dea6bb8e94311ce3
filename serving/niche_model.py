"""KServe predictors for the niche models: one per registered `niche-<slug>` champion
(`/v1/models/niche-<slug>:predict`), and the `niche` router that picks the niche model from
the instance's category and falls back to the global model for unknown niches."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pydantic
from kserve import Model
from kserve.errors import InferenceError
from mlflow.tracking import MlflowClient

from contentml import registry
from contentml.settings import Settings
from serving.payloads import instances_from_v1, parse_instances
from training.niche.automl import GLOBAL, slug
from training.niche.data import FEATURES

MAX_INSTANCES = 1_000
PREFIX = "niche-"

NicheFeatures = pydantic.create_model(
    "NicheFeatures",
    __config__=pydantic.ConfigDict(extra="forbid"),
    **{name: (pydantic.FiniteFloat, ...) for name in FEATURES},
)
"""An instance for a niche model: every engagement feature, as a finite number."""


class RoutedRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    category: pydantic.StrictStr = pydantic.Field(min_length=1)
    features: NicheFeatures


def niche_model_names(settings: Settings) -> list[str]:
    """Registered niche models (the global one included)."""
    client: MlflowClient = registry.connect(settings)
    found = client.search_registered_models(filter_string=f"name LIKE '{PREFIX}%'")
    return sorted(m.name for m in found)


def _predict(estimator: Any, rows: list[pydantic.BaseModel]) -> np.ndarray:
    frame = pd.DataFrame([row.model_dump() for row in rows])[list(FEATURES)]
    try:
        return estimator.predict(frame.to_numpy(dtype=float))
    except Exception as e:
        raise InferenceError(f"niche prediction failed: {e}") from e


class NicheModel(Model):
    """One niche's champion: instances are the engagement features."""

    def __init__(self, name: str, settings: Settings):
        super().__init__(name)
        self.settings = settings
        self.version: str | None = None

    def load(self) -> bool:
        self.version, pyfunc = registry.load_champion(self.settings, self.name)
        self.estimator = pyfunc.unwrap_python_model().estimator
        self.ready = True
        return self.ready

    def predict(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        rows = parse_instances(instances_from_v1(payload), NicheFeatures, MAX_INSTANCES)
        return {
            "predictions": [
                {"log_views_gained": float(v), "model_version": self.version}
                for v in _predict(self.estimator, rows)
            ]
        }


class NicheRouter(Model):
    """`{"category": ..., "features": {...}}` -> the category's niche model, else global."""

    def __init__(self, name: str, settings: Settings):
        super().__init__(name)
        self.settings = settings

    def load(self) -> bool:
        self.niches: dict[str, NicheModel] = {}
        for model_name in niche_model_names(self.settings):
            model = NicheModel(model_name, self.settings)
            try:
                model.load()
            except registry.RegistryError:
                continue  # registered but never promoted
            self.niches[model_name.removeprefix(PREFIX)] = model
        if GLOBAL not in self.niches:
            raise registry.RegistryError(
                f"model {PREFIX}{GLOBAL!s} has no champion: run `contentml niche automl` first"
            )
        self.ready = True
        return self.ready

    def predict(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        requests = parse_instances(instances_from_v1(payload), RoutedRequest, MAX_INSTANCES)
        predictions = []
        for request in requests:
            chosen = self.niches.get(slug(request.category), self.niches[GLOBAL])
            (value,) = _predict(chosen.estimator, [request.features])
            predictions.append(
                {
                    "log_views_gained": float(value),
                    "model": chosen.name,
                    "model_version": chosen.version,
                    "fallback": chosen.name == f"{PREFIX}{GLOBAL}",
                }
            )
        return {"predictions": predictions}
