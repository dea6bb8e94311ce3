"""`GET /v1/events`: the platform's events (`contentml/events.py`) as they happen, to the
frontend's dashboards. A WebSocket on that path; a plain GET (a browser's `EventSource`,
`Accept: text/event-stream`) gets the same messages as server-sent events, the fallback where
WebSockets do not pass. `GET /v1/events/schemas` answers the JSON schema of each kind's message.

Both take `kind` (repeated or comma-separated; an exact kind or a prefix such as `alert` or
`review.`) and `channel` (the content channel) filters; a kind that matches nothing is 400.
The server's token applies as on every /v1 route (`serving/admission.py`, which also takes it
from the `token` query parameter here, for browsers that cannot set headers on these).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.websockets import WebSocketDisconnect

from contentml.events import EventFilter, EventHub, EventKind, Subscription, message_schema

EVENTS_ROUTE = "/v1/events"

KindQuery = Annotated[
    list[str] | None,
    Query(description="Event kinds or prefixes (`alert`, `review.`), repeated or comma-separated."),
]
ChannelQuery = Annotated[
    list[str] | None, Query(description="Content channels, repeated or comma-separated.")
]

SSE_KEEPALIVE_SECONDS = 15.0
"""A comment line this often keeps proxies from closing an idle event stream."""

CLOSE_OVERFLOW = 1013
"""WebSocket close code ("try again later") for a client that fell too far behind."""
CLOSE_GOING_AWAY = 1001
"""WebSocket close code for a server that stops."""


def events_router(hub: EventHub) -> APIRouter:
    """The event routes over `hub`, this process's follower of the event bus."""
    router = APIRouter()

    @router.get(f"{EVENTS_ROUTE}/schemas")
    def schemas() -> dict:
        return {kind.value: message_schema(kind) for kind in EventKind}

    @router.websocket(EVENTS_ROUTE)
    async def websocket(
        socket: WebSocket, kind: KindQuery = None, channel: ChannelQuery = None
    ) -> None:
        try:
            event_filter = EventFilter.parse(kind or (), channel or ())
        except ValueError as e:
            await socket.send_denial_response(JSONResponse({"error": str(e)}, 400))
            return
        # Subscribed before the handshake ends: an event published once the client is
        # connected reaches it.
        subscription = hub.subscribe(event_filter)
        try:
            await socket.accept()
            sender = asyncio.create_task(_send(socket, subscription))
            try:
                while (await socket.receive())["type"] != "websocket.disconnect":
                    pass  # a client has nothing to say; its messages are ignored
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                    await sender
        finally:
            hub.unsubscribe(subscription)

    # Not in /openapi.json: an endless stream is no operation a schema can describe (and a
    # fuzzer calling it would wait forever); the README documents it.
    @router.get(EVENTS_ROUTE, include_in_schema=False)
    async def server_sent(
        kind: KindQuery = None, channel: ChannelQuery = None
    ) -> StreamingResponse:
        try:
            event_filter = EventFilter.parse(kind or (), channel or ())
        except ValueError as e:
            return JSONResponse({"error": str(e)}, 400)
        subscription = hub.subscribe(event_filter)
        return StreamingResponse(
            _server_sent(hub, subscription),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router


async def _send(socket: WebSocket, subscription: Subscription) -> None:
    async for event in subscription:
        await socket.send_text(event.model_dump_json())
    await socket.close(CLOSE_OVERFLOW if subscription.overflowed else CLOSE_GOING_AWAY)


async def _server_sent(hub: EventHub, subscription: Subscription) -> AsyncIterator[str]:
    """Each event as an SSE message (`id`, `event`: the kind, `data`: the JSON message);
    Starlette stops this when the client disconnects."""
    try:
        yield ": connected\n\n"  # flushes the headers: the client knows it is subscribed
        while True:
            try:
                event = await subscription.next(SSE_KEEPALIVE_SECONDS)
            except TimeoutError:
                yield ": keepalive\n\n"
                continue
            if event is None:
                return
            yield f"id: {event.id}\nevent: {event.kind.value}\ndata: {event.model_dump_json()}\n\n"
    finally:
        hub.unsubscribe(subscription)
