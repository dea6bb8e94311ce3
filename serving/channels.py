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
"""

from __future__ import annotations

import dataclasses
import datetime
import math

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from contentml.settings import Settings
from monitoring.anomaly import Anomaly, CrisisMonitor
from monitoring.crisis import QuarantineStore

NonNegative = pydantic.NonNegativeFloat


class ChannelPoint(pydantic.BaseModel):
    """One observation of a channel's metrics; any subset of them."""

    model_config = pydantic.ConfigDict(extra="forbid")

    event_timestamp: datetime.datetime
    views: NonNegative | None = None
    likes: NonNegative | None = None
    comment_rate: NonNegative | None = None
    strikes: pydantic.NonNegativeInt | None = None


class QuarantineRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    reason: str = pydantic.Field(min_length=1, max_length=1_000)


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


def channels_router(settings: Settings) -> APIRouter:
    """The routes, over one in-memory monitor and the durable quarantine store."""
    monitor = CrisisMonitor()
    store = QuarantineStore(settings.home / "crisis" / "quarantine.db")

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
        anomalies = monitor.observe(channel_id, point.event_timestamp, values)
        return JSONResponse(
            {
                **status(channel_id),
                "anomalies": [_anomaly_json(a) for a in anomalies],
            }
        )

    async def quarantine(channel_id: str, raw: Request) -> JSONResponse:
        try:
            request = await _parse(raw, QuarantineRequest)
        except pydantic.ValidationError as e:
            return _bad_request(e)
        store.quarantine(channel_id, request.reason)
        return JSONResponse(status(channel_id))

    async def release(channel_id: str) -> JSONResponse:
        if not store.release(channel_id):
            return JSONResponse(
                status_code=404, content={"error": f"channel {channel_id!r} is not quarantined"}
            )
        return JSONResponse(status(channel_id))

    async def get(channel_id: str) -> dict:
        return status(channel_id)

    async def quarantined() -> dict:
        return {"quarantined": [dataclasses.asdict(q) for q in store.all()]}

    router = APIRouter(prefix="/v1/channels", tags=["CrisisManager"])
    router.add_api_route("", quarantined, methods=["GET"])
    router.add_api_route("/{channel_id}", get, methods=["GET"])
    router.add_api_route("/{channel_id}/metrics", observe, methods=["POST"])
    router.add_api_route("/{channel_id}/quarantine", quarantine, methods=["POST"])
    router.add_api_route("/{channel_id}/quarantine", release, methods=["DELETE"])
    return router
