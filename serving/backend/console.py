"""The operator console: one server-rendered page at `/console` (the Jinja2 template
`templates/console.html`, vanilla JavaScript, no build step) showing

- the registered models, their aliases and their latest alias changes (the registry);
- the open review items, each with approve and reject buttons (`POST
  /v1/review/items/{id}/decision`, `serving/backend/review.py`);
- the RevenueOptimizer's experiments, each arm's P(best) and the stop rule's recommendation
  (`training/revenue/report.py`);
- a trend forecast with its interval for a chosen series (inline SVG, from `POST
  /predict/trend` with the series' last two weeks of the M4 hourly data set);
- the platform's events as they happen.

It follows `GET /v1/events` (a WebSocket, server-sent events where that fails) and re-renders a
section when an event concerns it (`GET /console/sections/{name}`, the same template's parts).

A browser cannot send a bearer header on a link: `/console?token=...` answers with the token in
the cookie `serving.admission.TOKEN_COOKIE` (HttpOnly, SameSite=Strict) and a redirect to
`/console`, so the token leaves the address bar and every later call of the page carries it;
its POSTs add `serving.admission.COOKIE_WRITE_HEADER`, without which the cookie opens no write.
The admin token opens the review decisions too; the callers' token shows the page, whose
decisions then answer 403.
"""

from __future__ import annotations

import datetime
import functools
from enum import StrEnum
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from contentml import registry
from contentml.events import EventKind
from contentml.settings import Settings
from serving.admission import TOKEN_COOKIE, TOKEN_QUERY
from training.data import load_m4_hourly
from training.quality.review_store import ReviewStore
from training.revenue.report import experiment_report
from training.revenue.store import RewardStore

TEMPLATES = Path(__file__).resolve().parent / "templates"

SERIES_OFFERED = 20
"""Series of the M4 hourly file (its first) the forecast's list offers."""

HISTORY_HOURS = 14 * 24
"""Hours of a series' history sent for its forecast (and drawn before it)."""

FORECAST_HOURS = 48

HISTORY_SHOWN = 5
"""Alias changes shown per model, newest first."""

REVIEW_ITEMS_SHOWN = 50


class Section(StrEnum):
    """The page's parts an event re-renders."""

    MODELS = "models"
    REVIEW = "review"
    EXPERIMENTS = "experiments"


def _utc(seconds: float) -> str:
    """Unix time as `2026-12-06 13:00 UTC`."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def console_router(settings: Settings, reviews: ReviewStore) -> APIRouter:
    """`/console` and its parts over the registry, the review queue `reviews` and the
    RevenueOptimizer's store, all read from the shared stores at each render."""
    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    templates.filters["utc"] = _utc
    rewards = RewardStore(settings.revenue_store)
    series_file = settings.data_dir / "m4-hourly" / "Hourly-train.csv"

    @functools.cache
    def series() -> dict[str, list[float]]:
        frame = load_m4_hourly(series_file, limit=SERIES_OFFERED)
        return {
            str(series_id): group["interest"].tail(HISTORY_HOURS).tolist()
            for series_id, group in frame.groupby("series_id", sort=False)
        }

    def models() -> list[dict[str, Any]]:
        client = registry.connect(settings)
        found = []
        for model in registry.registered_models(client):
            changes = registry.history(client, model.name)[-HISTORY_SHOWN:][::-1]
            found.append({"name": model.name, "aliases": dict(model.aliases), "history": changes})
        return found

    def experiments() -> list[dict[str, Any]]:
        return [experiment_report(rewards, e.name) for e in rewards.all()]

    readers = {
        Section.MODELS: models,
        Section.REVIEW: lambda: reviews.list_items(limit=REVIEW_ITEMS_SHOWN),
        Section.EXPERIMENTS: experiments,
    }

    def render(template: str, **context: Any) -> str:
        return templates.get_template(template).render(**context)

    def page() -> str:
        parts = {section.value: readers[section]() for section in Section}
        offered = list(series()) if series_file.is_file() else []
        return render(
            "console.html",
            **parts,
            series=offered,
            forecast_hours=FORECAST_HOURS,
            kinds=[kind.value for kind in EventKind],
        )

    async def console(request: Request) -> HTMLResponse:
        token = request.query_params.get(TOKEN_QUERY)
        if token is not None:  # admitted with it (serving.admission): keep it in the cookie
            response = RedirectResponse("/console", status_code=303)
            response.set_cookie(
                TOKEN_COOKIE,
                token,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            return response
        return HTMLResponse(await run_in_threadpool(page))

    async def section(name: Section) -> HTMLResponse:
        data = await run_in_threadpool(readers[name])
        return HTMLResponse(render("console_sections.html", section=name.value, **{name: data}))

    async def series_history(series_id: str) -> JSONResponse:
        offered = await run_in_threadpool(series)
        if series_id not in offered:
            return JSONResponse(
                {"error": f"no series {series_id!r}; offered: {', '.join(offered)}"}, 404
            )
        return JSONResponse({"series_id": series_id, "history": offered[series_id]})

    router = APIRouter(tags=["console"])
    router.add_api_route("/console", console, methods=["GET"], include_in_schema=False)
    router.add_api_route("/console/sections/{name}", section, methods=["GET"])
    router.add_api_route("/console/series/{series_id}", series_history, methods=["GET"])
    return router
