"""KServe predictors for the niche models: one per registered `niche-<slug>` champion
(`/v1/models/niche-<slug>:predict`), and the `niche` router that picks the niche model from
the instance's category and falls back to the global model for unknown niches."""

from __future__ import annotations

import datetime
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pydantic
from kserve.errors import InferenceError

from contentml import features, names, registry
from contentml.names import GLOBAL_NICHE, NICHE_MODEL_PREFIX
from contentml.settings import Settings
from feature_repo.niche_schema import FEATURES
from serving.model_server.payloads import instances_from_v1, parse_instances
from serving.model_server.refresh import HeldLookups, Refresher
from serving.model_server.versions import (
    CachedPredictor,
    OffLoopModel,
    ServingOptions,
    load_pyfunc,
    request_id_of,
)
from training.niche.data import video_features

MAX_INSTANCES = 1_000
NICHE_TRAIN_COMMAND = "contentml niche automl"

logger = logging.getLogger(__name__)

Count = pydantic.NonNegativeInt

FIRST_DATE = pd.Timestamp.min.ceil("D").date()
LAST_DATE = pd.Timestamp.max.floor("D").date()
"""The dates pandas' nanosecond timestamps hold (1677-09-22 to 2262-04-11): the features are
computed on them."""


class TrendingVideo(pydantic.BaseModel):
    """A video on its first day on a country's trending list: what the content pipeline knows
    then. The channel's history comes from Feast's online store."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    category: str = pydantic.Field(min_length=1)
    channel_id: str = pydantic.Field(min_length=1)
    country: str = pydantic.Field(pattern=r"^[A-Z]{2}$")
    title: str = pydantic.Field(min_length=1, max_length=1_000)
    tags: str = ""
    """'|'-separated, as YouTube exports them."""
    views: Count
    likes: Count
    dislikes: Count
    comment_total: Count
    trending_date: datetime.date = pydantic.Field(strict=False, ge=FIRST_DATE, le=LAST_DATE)
    """ISO date (`2018-06-14`) of the first day on the list."""


ChannelKey = tuple[str, str]
"""(channel_id, country): whose history Feast's online store keeps."""


def read_channel_histories(
    store: features.FeatureStore, keys: list[ChannelKey]
) -> dict[ChannelKey, dict[str, float]]:
    """`CHANNEL_HISTORY` of each channel from the online store (a new one's for a channel it
    does not know)."""
    frame = pd.DataFrame(keys, columns=["channel_id", "country"])
    try:
        history = features.online_channel_history(store, frame)
    except Exception as e:
        raise InferenceError(f"reading the channel history from Feast failed: {e}") from e
    return dict(zip(keys, history.to_dict("records"), strict=True))


def own_features(videos: list[str]) -> dict[str, dict[str, float]]:
    """`VIDEO_FEATURES` of videos given as their requests' JSON: what a video's own features
    depend on, so they are computed once per distinct video and held (`NicheModel`)."""
    first = pd.DataFrame([json.loads(video) for video in videos])
    first["event_timestamp"] = pd.to_datetime(first["trending_date"]).dt.tz_localize("UTC")
    return dict(zip(videos, video_features(first).to_dict("records"), strict=True))


def _feature_rows(
    histories: HeldLookups[ChannelKey, dict[str, float]],
    own: HeldLookups[str, dict[str, float]],
    videos: list[TrendingVideo],
) -> list[dict[str, float]]:
    """`FEATURES` of each video, JSON-ready (what the prediction cache is keyed by): its own
    from the request (`own_features`, as held), its channel's from Feast (as held)."""
    requests = [video.model_dump_json() for video in videos]
    keys = [(video.channel_id, video.country) for video in videos]
    found, held = own.get_many(requests), histories.get_many(keys)
    rows = []
    for request, key in zip(requests, keys, strict=True):
        values = {**found[request], **held[key]}
        rows.append({name: _number(values[name]) for name in FEATURES})
    return rows


def _number(value: Any) -> float:
    """A feature as a float; a history the store has no value for is NaN, as in training."""
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class NicheVersion:
    version: str
    estimator: Any
    """The winning trial's fitted estimator (`predict` on rows of `FEATURES`)."""


class NicheModel(CachedPredictor[NicheVersion, TrendingVideo]):
    """One niche's champion: instances are `TrendingVideo`s."""

    train_command = NICHE_TRAIN_COMMAND

    def __init__(self, name: str, settings: Settings, options: ServingOptions | None = None):
        super().__init__(name, settings, options)
        self.refresher: Refresher | None = None

    def load(self, aliases: registry.Aliases | None = None) -> bool:
        self.store = features.feature_store(self.settings)
        # A channel's history is read from memory: read through on its first video, read
        # again every poll interval, so new materialized data is answered within it.
        self.histories: HeldLookups[ChannelKey, dict[str, float]] = HeldLookups(
            lambda keys: read_channel_histories(self.store, keys)
        )
        # A video's own features depend on its request alone: held, never refreshed. Through
        # pandas they cost a cached call 10 of its 11 ms of CPU.
        self.own_features: HeldLookups[str, dict[str, float]] = HeldLookups(own_features)
        self._stop_refresher()  # a load after an unload: the previous refresher ends
        self.refresher = Refresher(
            f"{self.name}-channels", self.histories.refresh, self.settings.serving_poll_seconds
        ).start()
        return super().load(aliases)

    def stop(self) -> None:
        self._stop_refresher()
        super().stop()

    def _stop_refresher(self) -> None:
        if self.refresher is not None:
            self.refresher.stop()
            self.refresher = None

    def load_version(self, version: str) -> NicheVersion:
        return NicheVersion(
            version, load_pyfunc(self.name, version).unwrap_python_model().estimator
        )

    def parse(self, payload: dict) -> list[TrendingVideo]:
        return parse_instances(instances_from_v1(payload), TrendingVideo, MAX_INSTANCES)

    def model_inputs(self, requests: list[TrendingVideo]) -> list[dict[str, Any]]:
        return _feature_rows(self.histories, self.own_features, requests)

    def infer(self, state: NicheVersion, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = pd.DataFrame.from_records(inputs, columns=list(FEATURES)).to_numpy(dtype=float)
        try:
            values = state.estimator.predict(rows)
        except Exception as e:
            raise InferenceError(f"niche prediction failed: {e}") from e
        return [{"log_views_gained": float(v)} for v in values]


class NicheRouter(OffLoopModel):
    """A `TrendingVideo` -> its category's niche model, else the global model. The niche
    models follow their own aliases (and canary split); the router routes, and serves each
    niche model registered after it started (a later AutoML run) from the next poll on."""

    train_command = NICHE_TRAIN_COMMAND

    def __init__(self, name: str, settings: Settings, options: ServingOptions | None = None):
        super().__init__(name)
        self.settings = settings
        self.options = options or ServingOptions()
        self.niches: dict[str, NicheModel] = {}
        self.on_new_niche: Callable[[NicheModel], None] | None = None
        """Called with each niche model found after `load()` (the server exposes it)."""

    def load(self) -> bool:
        self.refresh(registry.connect(self.settings))
        if not self.ready:
            logger.warning("not serving %s yet: %s", self.name, self.not_ready_reason())
        return self.ready

    def refresh(
        self, client: registry.RegistryClient, aliases: registry.Aliases | None = None
    ) -> bool:
        """Follow every niche model's aliases (`aliases`: the watcher's read of this poll;
        None: read them), and take on niche models registered since."""
        if aliases is None:
            aliases = registry.read_aliases(client)
        changed = False
        for model in self.niches.values():
            changed |= model.refresh(client, aliases)
        for model_name in aliases.models(NICHE_MODEL_PREFIX):
            niche = model_name.removeprefix(NICHE_MODEL_PREFIX)
            if niche in self.niches:
                continue
            model = NicheModel(model_name, self.settings, self.options)
            try:
                # Not ready until it has a champion; `refresh` then serves it.
                model.load(aliases)
            except Exception as e:  # a broken champion must not stop the other niches
                logger.error("%s failed to load; retried at the next poll: %s", model_name, e)
            self.niches[niche] = model
            changed = True
            if self.on_new_niche is not None:
                self.on_new_niche(model)
        self.ready = GLOBAL_NICHE in self.niches and self.niches[GLOBAL_NICHE].ready
        return changed

    def not_ready_reason(self) -> str:
        global_model = names.niche_model_name(GLOBAL_NICHE)
        return f"{global_model} has no champion yet: train one with `{self.train_command}`"

    def _model_for(self, video: TrendingVideo) -> NicheModel:
        """The video's niche model when it serves, else the global model."""
        found = self.niches.get(names.niche_slug(video.category))
        return found if found is not None and found.ready else self.niches[GLOBAL_NICHE]

    def predict_now(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        request_id = request_id_of(payload, headers)
        videos = parse_instances(instances_from_v1(payload), TrendingVideo, MAX_INSTANCES)
        return {"predictions": self.answer(videos, request_id), "request_id": request_id}

    def answer(
        self, videos: Sequence[TrendingVideo], request_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Each video's answer from its niche's model (else the global one: `fallback`)."""
        chosen = [self._model_for(v) for v in videos]
        predictions: list[dict[str, Any]] = [{} for _ in videos]
        for model in set(chosen):
            rows = [i for i, c in enumerate(chosen) if c is model]
            answers = model.answer([videos[i] for i in rows], request_id, rows)
            for i, answer in zip(rows, answers, strict=True):
                predictions[i] = {
                    **answer,
                    "model": model.name,
                    "fallback": model.name == names.niche_model_name(GLOBAL_NICHE),
                }
        return predictions
