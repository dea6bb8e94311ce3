"""CrisisManager's routes on the model server: feed a channel's metrics, see its anomalies,
quarantine it (no new uploads) and release it.

    POST   /v1/channels/{channel_id}/metrics      {"event_timestamp", "views", "likes", ...}
    GET    /v1/channels/{channel_id}              quarantined or not, and why
    POST   /v1/channels/{channel_id}/quarantine   {"reason": "..."}
    DELETE /v1/channels/{channel_id}/quarantine
    GET    /v1/channels                           every quarantined channel

Detection is streaming (`monitoring.anomaly.CrisisMonitor`): a point is scored against the
channel's recent history when it arrives, so an anomaly is flagged on the request that shows
it. Quarantine is a person's (or the content pipeline's) decision, made through this API.

Channel ids are checked (`contentml.names.channel_id`) by `serving.admission` before any route
runs: a hostile one gets a 400 naming the problem. Quarantine and each channel's recent history
(a window of points per metric) are in the shared SQL store (`Settings.backend_store`,
`monitoring.crisis`): every replica, and a restarted one, gives the same answer. The store work
runs off the event loop.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Annotated

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from contentml import events
from contentml.settings import Settings
from monitoring.anomaly import Anomaly, AnomalyConfig, CrisisMonitor
from monitoring.crisis import MAX_REASON, QuarantineStore, SqlMetricHistory

MAX_METRIC_VALUE = 1e15
"""Largest views, likes or comment rate a point may report: beyond any channel's lifetime views,
so a larger value (or Infinity, NaN) is a caller's bug, refused before it enters a history."""

MAX_STRIKES = 1_000
"""Largest strike count a point may report (YouTube ends a channel at its third strike)."""

Metric = Annotated[float, pydantic.Field(ge=0, le=MAX_METRIC_VALUE, allow_inf_nan=False)]


class ChannelPoint(pydantic.BaseModel):
    """One observation of a channel's metrics; any subset of them, each finite and bounded (a
    point refused is not added to the channel's history, so a retry adds it once)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    event_timestamp: datetime.datetime
    views: Metric | None = None
    likes: Metric | None = None
    comment_rate: Metric | None = None
    strikes: Annotated[int, pydantic.Field(ge=0, le=MAX_STRIKES)] | None = None


class QuarantineRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    reason: str = pydantic.Field(min_length=1, max_length=MAX_REASON)


def _bad_request(error: pydantic.ValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()
    )
    return JSONResponse(status_code=400, content={"error": problems})


async def _parse(raw: Request, kind: type[pydantic.BaseModel]) -> pydantic.BaseModel:
    return kind.model_validate_json(await raw.body())


def _anomaly_json(anomaly: Anomaly) -> dict:
    # A new strike scores infinity, which JSON cannot carry: it is sent as null.
    return {
        **dataclasses.asdict(anomaly),
        "event_timestamp": anomaly.event_timestamp.isoformat(),
        "score": anomaly.score if math.isfinite(anomaly.score) else None,
    }


def _announce(status: dict) -> None:
    """A `quarantine` event with a channel's state after a quarantine or a release."""
    data = {key: status[key] for key in ("channel_id", "quarantined", "reason")}
    events.publish(events.EventKind.QUARANTINE, data, channel=status["channel_id"])


def channels_router(settings: Settings) -> APIRouter:
    """The routes, over the shared quarantine store and metric history."""
    store = QuarantineStore(settings.backend_store)
    monitor = CrisisMonitor(AnomalyConfig(), SqlMetricHistory(store.engine))

    def status(channel_id: str) -> dict:
        found = store.get(channel_id)
        return {
            "channel_id": channel_id,
            "quarantined": found is not None,
            "reason": found.reason if found else None,
            "since": found.since if found else None,
        }

    async def observe(channel_id: str, raw: Request) -> JSONResponse:
        try:
            point = await _parse(raw, ChannelPoint)
        except pydantic.ValidationError as e:
            return _bad_request(e)
        values = point.model_dump(exclude_none=True, exclude={"event_timestamp"})

        def scored() -> dict:
            anomalies = [
                _anomaly_json(a) for a in monitor.observe(channel_id, point.event_timestamp, values)
            ]
            for anomaly in anomalies:
                events.publish(events.EventKind.ANOMALY, anomaly, channel=channel_id)
            return {**status(channel_id), "anomalies": anomalies}

        # The store is SQL: off the event loop, like every route's store work here.
        return JSONResponse(await run_in_threadpool(scored))

    async def quarantine(channel_id: str, raw: Request) -> JSONResponse:
        try:
            request = await _parse(raw, QuarantineRequest)
        except pydantic.ValidationError as e:
            return _bad_request(e)
        await run_in_threadpool(store.quarantine, channel_id, request.reason)
        now = await run_in_threadpool(status, channel_id)
        await run_in_threadpool(_announce, now)
        return JSONResponse(now)

    def release(channel_id: str) -> JSONResponse:
        if not store.release(channel_id):
            return JSONResponse(
                status_code=404, content={"error": f"channel {channel_id!r} is not quarantined"}
            )
        now = status(channel_id)
        _announce(now)
        return JSONResponse(now)

    def get(channel_id: str) -> JSONResponse:
        return JSONResponse(status(channel_id))

    def quarantined() -> dict:
        return {"quarantined": [dataclasses.asdict(q) for q in store.all()]}

    router = APIRouter(prefix="/v1/channels", tags=["CrisisManager"])
    router.add_api_route("", quarantined, methods=["GET"])
    # `:path` as in `serving.admission.NAMED_ROUTES`, which checks the ids; the longer routes
    # first, since `/{channel_id:path}` would match them too.
    router.add_api_route("/{channel_id:path}/metrics", observe, methods=["POST"])
    router.add_api_route("/{channel_id:path}/quarantine", quarantine, methods=["POST"])
    router.add_api_route("/{channel_id:path}/quarantine", release, methods=["DELETE"])
    router.add_api_route("/{channel_id:path}", get, methods=["GET"])
    return router
