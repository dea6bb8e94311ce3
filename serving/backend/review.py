"""The human review queue over HTTP, its expiry check and its metrics:

    GET  /v1/review/items?status=&channel=&limit=     {"items": [item, ...]}, oldest first
    GET  /v1/review/items/{item_id}                   one item
    POST /v1/review/items/{item_id}/decision          {"decision": "approve|reject",
                                                       "label": "optional", "note": "optional"}
                                                      -> the decided item

`status` is `pending`, `expired`, `approved`, `rejected`, or `open` (pending and expired, the
default). The routes are admin routes (`serving.admission.ADMIN_ROUTES`): with an admin token
set they need it. A bad query or body is 422 naming the field, an unknown item 404, an item
already decided 409. The queue itself, and the function API other code calls, is
`training.quality.review_store.ReviewStore`.

`ReviewExpiry` is a chore of the server's periodic loop (`VersionWatcher`): it marks the
items undecided for `Settings.review_expiry_hours` `expired` and publishes `review.expired`.
`/metrics` has `contentml_review_items{status}` read from the shared store at each scrape
(every replica reports the same queue), `overdue` among them: the escalation alert's input.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from http import HTTPStatus
from typing import Annotated, Literal

import pydantic
import sqlalchemy as sa
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from starlette.concurrency import run_in_threadpool

from contentml.errors import UserError
from contentml.settings import Settings
from training.quality.review_store import (
    FLAGGED_CLASSES,
    LIST_LIMIT,
    MAX_LIST_LIMIT,
    MAX_NOTE,
    AlreadyDecided,
    Decision,
    ItemNotFound,
    ReviewStore,
    Status,
)

logger = logging.getLogger(__name__)

ITEMS_METRIC = "contentml_review_items"
"""Review items per status, and `overdue` (open past `Settings.review_expiry_hours`)."""

EXPIRED = Counter(
    "contentml_review_expired",
    "Review items this process marked expired (escalated) after waiting past the expiry time",
)

StatusQuery = Literal["open", "pending", "expired", "approved", "rejected"]


class DecisionBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    decision: Decision
    label: str | None = pydantic.Field(
        None,
        max_length=32,
        description=f"The class a rejected text is labelled for training, one of "
        f"{', '.join(FLAGGED_CLASSES)}; default: the classifier's most likely of them. An "
        "approved text is labelled `neither`.",
    )
    note: str | None = pydantic.Field(None, max_length=MAX_NOTE)


def _problem(status: HTTPStatus, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def review_router(store: ReviewStore) -> APIRouter:
    """The routes over `store`; the store's SQL runs off the event loop."""

    async def list_items(
        status: StatusQuery = "open",
        channel: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = LIST_LIMIT,
    ) -> dict:
        wanted = None if status == "open" else Status(status)
        found = await run_in_threadpool(store.list_items, wanted, channel, limit)
        return {"items": [item.to_dict() for item in found]}

    async def get_item(item_id: str) -> JSONResponse:
        try:
            item = await run_in_threadpool(store.get, item_id)
        except ItemNotFound as e:
            return _problem(HTTPStatus.NOT_FOUND, str(e))
        return JSONResponse(item.to_dict())

    async def decide(item_id: str, body: DecisionBody) -> JSONResponse:
        try:
            item = await run_in_threadpool(
                store.decide, item_id, body.decision, body.label, body.note
            )
        except ItemNotFound as e:
            return _problem(HTTPStatus.NOT_FOUND, str(e))
        except AlreadyDecided as e:
            return _problem(HTTPStatus.CONFLICT, str(e))
        except UserError as e:
            return _problem(HTTPStatus.UNPROCESSABLE_ENTITY, str(e))
        return JSONResponse(item.to_dict())

    router = APIRouter(prefix="/v1/review", tags=["review"])
    router.add_api_route("/items", list_items, methods=["GET"])
    # The longer route first: `{item_id:path}` would match it too.
    router.add_api_route(
        "/items/{item_id:path}/decision",
        decide,
        methods=["POST"],
        responses={404: {}, 409: {"description": "already decided"}, 422: {}},
    )
    router.add_api_route("/items/{item_id:path}", get_item, methods=["GET"])
    return router


class ReviewExpiry:
    """The expiry check, one call per tick of a periodic loop."""

    def __init__(self, store: ReviewStore, settings: Settings):
        self.store = store
        self.after_seconds = settings.review_expiry_hours * 3600

    def __call__(self) -> None:
        for item in self.store.expire(self.after_seconds):
            EXPIRED.inc()
            logger.warning(
                "review item %s (video %s) undecided for %g h: escalated",
                item.item_id,
                item.video_id,
                self.after_seconds / 3600,
            )


class ReviewCollector:
    """`contentml_review_items{status}` read from the store at each scrape."""

    def __init__(self, store: ReviewStore, overdue_after_seconds: float):
        self.store = store
        self.overdue_after_seconds = overdue_after_seconds

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()  # registration asks for the name only: no database read

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            ITEMS_METRIC,
            "Review queue items per status; overdue: open past the expiry time",
            labels=["status"],
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self.store.counts(self.overdue_after_seconds)
        except sa.exc.SQLAlchemyError as e:  # a scrape must not fail for the queue
            logger.error("review metrics: reading the queue failed: %s", e, exc_info=e)
            return
        family = self._family()
        for status, count in counts.items():
            family.add_metric([status], count)
        yield family


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, ReviewCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register_review_metrics(
    store: ReviewStore, settings: Settings, registry: CollectorRegistry = REGISTRY
) -> ReviewCollector:
    """Expose the queue's gauge in `registry`, once: a second call (another server in the same
    process) points the registered collector at its store instead."""
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = ReviewCollector(store, 0.0)
            registry.register(collector)
        collector.store = store
        collector.overdue_after_seconds = settings.review_expiry_hours * 3600
        return collector
