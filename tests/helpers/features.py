"""The training pipeline's feature step on a test's own data: write the sources, apply the
definitions and materialize up to the last observation."""

from __future__ import annotations

import pandas as pd
from feast import FeatureStore

from contentml.features import apply_definitions, feature_store, materialize, write_sources
from contentml.settings import Settings


def feature_step(settings: Settings, series: pd.DataFrame, videos: pd.DataFrame) -> FeatureStore:
    store = feature_store(settings)
    write_sources(settings, series, videos)
    apply_definitions(store)
    # End at the last observation, as the training pipeline does: the bound is inclusive.
    materialize(store, series["event_timestamp"].max())
    return store
