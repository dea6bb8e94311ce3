"""KServe predictor for the trend forecaster (`/v1/models/trend:predict`, V2 `infer`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest

from contentml import features
from contentml.settings import Settings
from serving.model_server.payloads import instances_from_v1, parse_instances
from serving.model_server.refresh import HeldLookups, Refresher
from serving.model_server.versions import CachedPredictor, ServingOptions, load_pyfunc
from training.trend.forecasters import ForecastInputError
from training.trend.model import TrendRequest, UnknownSeries

MAX_INSTANCES = 1_000
"""A larger batch belongs in a batch job, not a synchronous call."""


@dataclass(frozen=True)
class TrendVersion:
    version: str
    forecaster: mlflow.pyfunc.PyFuncModel


class TrendModel(CachedPredictor[TrendVersion, TrendRequest]):
    train_command = "contentml pipeline run training --local"

    def __init__(self, name: str, settings: Settings, options: ServingOptions | None = None):
        super().__init__(name, settings, options)
        self.refresher: Refresher | None = None

    def load(self) -> bool:
        self.store = features.feature_store(self.settings)
        # A request by series id reads its history from memory, not from the online store:
        # held histories are read again every poll interval, so newly materialized data is
        # answered within it (a new series is read through on its first request).
        self.histories: HeldLookups[str, list[float] | None] = HeldLookups(
            lambda ids: features.online_history(self.store, ids)
        )
        self._stop_refresher()  # a load after an unload: the previous refresher ends
        self.refresher = Refresher(
            f"{self.name}-histories", self.histories.refresh, self.settings.serving_poll_seconds
        ).start()
        return super().load()

    def stop(self) -> None:
        self._stop_refresher()
        super().stop()

    def _stop_refresher(self) -> None:
        if self.refresher is not None:
            self.refresher.stop()
            self.refresher = None

    def load_version(self, version: str) -> TrendVersion:
        return TrendVersion(version, load_pyfunc(self.name, version))

    def parse(self, payload: dict | InferRequest) -> list[TrendRequest]:
        if isinstance(payload, InferRequest):
            return _requests_from_v2(payload)
        return parse_instances(instances_from_v1(payload), TrendRequest, MAX_INSTANCES)

    def model_inputs(self, requests: list[TrendRequest]) -> list[dict[str, Any]]:
        # Series known to the feature store are forecast from their online history, so a
        # precomputed (or cached) forecast is only served while it matches the latest data.
        by_id = [r.series_id for r in requests if r.series_id and r.history is None]
        histories = self.histories.get_many(by_id) if by_id else {}
        inputs = []
        for request in requests:
            item = request.model_dump(exclude_none=True)
            if request.series_id in histories and histories[request.series_id] is not None:
                item.setdefault("history", histories[request.series_id])
            inputs.append(item)
        return inputs

    def infer(self, state: TrendVersion, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            return [f.model_dump() for f in state.forecaster.predict(inputs)]
        except (UnknownSeries, ForecastInputError) as e:
            raise InvalidInput(str(e)) from e
        except Exception as e:
            raise InferenceError(f"trend forecast failed: {e}") from e

    def v2_outputs(self, answers: list[dict[str, Any]]) -> list[InferOutput]:
        return _v2_outputs(answers)


def _requests_from_v2(request: InferRequest) -> list[TrendRequest]:
    """V2 inputs: `series_id` (BYTES [n]) or `history` (FP32/FP64 [n, length]), and optional
    `horizon` (INT [1] or [n])."""
    columns: dict[str, list] = {}
    for tensor in request.inputs:
        try:
            values = tensor.as_numpy()
        except Exception as e:
            raise InvalidInput(f"input {tensor.name!r} cannot be decoded: {e}") from e
        if tensor.name == "series_id":
            columns["series_id"] = [
                v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)
            ]
        elif tensor.name == "history":
            columns["history"] = np.atleast_2d(values).astype(float).tolist()
        elif tensor.name == "horizon":
            columns["horizon"] = [int(v) for v in values.reshape(-1)]
        else:
            raise InvalidInput(
                f"unknown input {tensor.name!r}; expected series_id, history, horizon"
            )
    rows = len(columns.get("series_id") or columns.get("history") or [])
    if "horizon" in columns and len(columns["horizon"]) == 1:
        columns["horizon"] = columns["horizon"] * rows
    if any(len(v) != rows for v in columns.values()):
        raise InvalidInput("inputs series_id, history and horizon must have the same length")
    return parse_instances(
        [{name: values[i] for name, values in columns.items()} for i in range(rows)],
        TrendRequest,
        MAX_INSTANCES,
    )


def _v2_outputs(forecasts: list[dict[str, Any]]) -> list[InferOutput]:
    if len({len(f["forecast"]) for f in forecasts}) != 1:
        raise InvalidInput("a V2 request must use one horizon for every row")
    outputs = [
        InferOutput(
            name=key,
            shape=[len(forecasts), len(forecasts[0][key])],
            datatype="FP64",
            data=np.asarray([f[key] for f in forecasts]),
        )
        for key in ("forecast", "lower", "upper", "lower_95", "upper_95")
    ]
    outputs.append(
        InferOutput(
            name="direction",
            shape=[len(forecasts)],
            datatype="BYTES",
            data=[f["direction"] for f in forecasts],
        )
    )
    return outputs
