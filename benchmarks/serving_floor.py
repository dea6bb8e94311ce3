"""`make bench`: every served route against the floor of the stack it runs on, in one run.

Three servers, each a child process on loopback: a bare FastAPI echo (uvicorn, one route), a
bare KServe echo model (KServe's own ModelServer and app), and `contentml serve --workers 0`
(no batch worker loading beside the routes timed) on a home with the demo's champions
(`contentml demo`, run first where a family has none). Each route
takes `--calls` sequential calls over one keep-alive connection after a warm-up; the figures
are p50 and p99 in ms and each route's p99 over the bare FastAPI echo's p99 (`over_floor`).

Routes: trend by series id and by history (a cache hit), quality cached (one text) and
uncached (a new text each call, batch 1), the niche router, a bandit choice, and the three
task routes (`/predict/trend` and `/score/quality` cached; `/generate/script` generates, and
takes `GENERATING_CALLS` calls).
Beside them, one online feature lookup (`contentml.features.online_history`, one series) in
this process against the home's SQLite online store and against Redis (`--redis`, a Feast
project of its own, torn down after).

Prints one JSON line on stdout; a table on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from kserve import Model

from benchmarks.timing import summary
from contentml import features, registry
from contentml.names import GLOBAL_NICHE, comma_list, niche_model_name
from contentml.settings import Settings
from entrypoints.demo import free_port, model_server, trending_video
from feature_repo.features import topic_recent_fv
from serving.server import BoundModelServer
from training.data import SERIES_END

CALLS = 400
WARMUP_CALLS = 20
SERIES_ID = "H1"
NICHE_CATEGORY = "Music"
ECHO_BODY = {"instances": [{"series_id": SERIES_ID, "horizon": 48}]}
READY_SECONDS = 120.0


# --- the floors: bare servers that answer what they are sent -----------------------------------


def serve_fastapi_echo(port: int) -> None:
    """A FastAPI app with one JSON echo route, on uvicorn as KServe runs it (one worker)."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        return await request.json()

    @app.get("/ready")
    async def ready() -> dict:
        return {"ready": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_kserve_echo(port: int) -> None:
    """A KServe model whose `predict` returns its payload, on KServe's ModelServer and app."""

    class Echo(Model):
        def load(self) -> bool:
            self.ready = True
            return self.ready

        async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
            return payload

    model = Echo("echo")
    model.load()
    BoundModelServer("127.0.0.1", http_port=port, workers=1).start([model])


ECHOES: dict[str, Callable[[int], None]] = {
    "fastapi": serve_fastapi_echo,
    "kserve": serve_kserve_echo,
}


@contextlib.contextmanager
def echo_server(kind: str) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ready = f"{url}/ready" if kind == "fastapi" else f"{url}/v2/health/ready"
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.serving_floor", "--echo", kind, "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the {kind} echo exited with status {process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready, timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {kind} echo not ready after {READY_SECONDS} s")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- timing ----------------------------------------------------------------------------------


def timed_calls(
    url: str, path: str, bodies: Callable[[int], Any], calls: int, token: str = ""
) -> dict[str, float]:
    """`calls` sequential POSTs of `bodies(i)` over one keep-alive connection, after
    `WARMUP_CALLS` untimed ones; every answer must be 200."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timings = []
    with httpx.Client(base_url=url, timeout=60.0, headers=headers) as client:
        for i in range(-WARMUP_CALLS, calls):
            started = time.perf_counter()
            response = client.post(path, json=bodies(i))
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"POST {path} answered {response.status_code}: {response.text}")
            if i >= 0:
                timings.append(elapsed * 1000)
    return summary(timings, digits=3)


def same(body: Any) -> Callable[[int], Any]:
    return lambda _: body


def route_calls(settings: Settings) -> dict[str, tuple[str, Callable[[int], Any]]]:
    """Route name -> (path, body of call i). Cached routes send one body every time; the
    uncached quality call sends a text no call sent before."""
    history = (100 + 20 * np.sin(2 * np.pi * np.arange(336) / 24)).round(3).tolist()
    text = "Ten minute pasta for busy weeknights"
    run = uuid.uuid4().hex[:8]
    return {
        "trend_by_id": ("/v1/models/trend:predict", same(ECHO_BODY)),
        "trend_by_history": (
            "/v1/models/trend:predict",
            same({"instances": [{"history": history, "horizon": 48}]}),
        ),
        "quality_cached": (
            "/v1/models/quality:predict",
            same({"instances": [{"text": text, "kind": "title"}]}),
        ),
        "quality_uncached": (
            "/v1/models/quality:predict",
            lambda i: {"instances": [{"text": f"{text}, take {run}-{i}", "kind": "title"}]},
        ),
        "niche": (
            "/v1/models/niche:predict",
            same({"instances": [trending_video(settings, NICHE_CATEGORY)]}),
        ),
        "revenue": (
            "/v1/models/revenue:predict",
            same({"instances": [{"experiment": f"floor-{run}", "arms": ["bold", "plain"]}]}),
        ),
        "task_trend": ("/predict/trend", same({"history": history, "horizon": 48})),
        "task_quality": ("/score/quality", same({"text": text})),
        "task_script": (
            "/generate/script",
            same({"topic": "weeknight pasta", "persona": "a calm cooking channel"}),
        ),
    }


CACHED_OR_IN_MEMORY = (
    "trend_by_id",
    "trend_by_history",
    "quality_cached",
    "niche",
    "revenue",
    "task_trend",
    "task_quality",
)
"""The routes the target (p99 <= 1.5x the bare FastAPI echo's) applies to."""

TARGET_OVER_FLOOR = 1.5

GENERATING = ("task_script",)
"""Routes that generate text (about a second a call on 2 cores): timed over fewer calls."""

GENERATING_CALLS = 40


# --- online feature lookup ---------------------------------------------------------------------


def lookup_figures(settings: Settings, calls: int) -> dict[str, float]:
    store = features.feature_store(settings)
    timings = []
    for i in range(-WARMUP_CALLS, calls):
        started = time.perf_counter()
        (history,) = features.online_history(store, [SERIES_ID]).values()
        elapsed = time.perf_counter() - started
        if history is None:
            raise RuntimeError(
                f"{SERIES_ID} has no online history in {settings.feast_online_store}"
            )
        if i >= 0:
            timings.append(elapsed * 1000)
    return summary(timings, digits=3)


def redis_lookup_figures(settings: Settings, redis_url: str, calls: int) -> dict[str, float]:
    """The same lookup with the Redis online store: the home's sources materialized into a
    Feast project of this run's own (its own registry file), torn down after."""
    with tempfile.TemporaryDirectory(prefix="contentml-floor-") as scratch:
        on_redis = Settings.from_env(
            {
                **settings.to_env(),
                "CONTENTML_FEAST_ONLINE_STORE": "redis",
                "CONTENTML_FEAST_REDIS_URL": redis_url,
                "CONTENTML_FEAST_REGISTRY": str(Path(scratch) / "registry.db"),
                "CONTENTML_FEAST_PROJECT": f"floor_{uuid.uuid4().hex[:8]}",
            }
        )
        store = features.feature_store(on_redis)
        features.apply_definitions(store)
        try:
            # SERIES_END is inclusive and after every series' last hour: all of them.
            features.materialize(store, SERIES_END.to_pydatetime(), [topic_recent_fv])
            return lookup_figures(on_redis, calls)
        finally:
            store.teardown()


# --- the run ------------------------------------------------------------------------------------


FAMILY_MODELS = {
    "trend": "trend",
    "quality": "quality",
    "niche": niche_model_name(GLOBAL_NICHE),
    "script": "script",
}
"""The registered model each family's routes need a champion of (revenue needs none)."""

ROUTE_FAMILIES = {
    "trend_by_id": "trend",
    "trend_by_history": "trend",
    "quality_cached": "quality",
    "quality_uncached": "quality",
    "niche": "niche",
    "revenue": "revenue",
    "task_trend": "trend",
    "task_quality": "quality",
    "task_script": "script",
}


def missing_families(settings: Settings, families: set[str]) -> list[str]:
    client = registry.connect(settings)
    return [
        family
        for family, model in FAMILY_MODELS.items()
        if family in families
        and registry.alias_version(client, model, registry.Alias.CHAMPION) is None
    ]


def run(settings: Settings, calls: int, redis_url: str, routes: list[str]) -> dict[str, Any]:
    missing = missing_families(settings, {ROUTE_FAMILIES[r] for r in routes})
    if missing:
        print(f"[bench] no champion of {missing}: running `contentml demo`", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "entrypoints.cli", "demo", "--families", ",".join(missing)],
            env={**os.environ, **settings.to_env()},
            stdout=subprocess.DEVNULL,
            check=True,
        )
    report: dict[str, Any] = {"benchmark": "serving_floor", "calls": calls, "routes": {}}
    with echo_server("fastapi") as url:
        floor = timed_calls(url, "/echo", same(ECHO_BODY), calls)
    with echo_server("kserve") as url:
        kserve = timed_calls(url, "/v1/models/echo:predict", same(ECHO_BODY), calls)
    report["floor"] = {"fastapi_echo": floor, "kserve_echo": kserve}
    port = free_port()
    # The script task route's provider chain calls this server's own OpenAI routes.
    serving = Settings.from_env(
        {**settings.to_env(), "CONTENTML_SERVING_URL": f"http://127.0.0.1:{port}"}
    )
    with model_server(serving, port, "--workers", "0") as url:
        for name, (path, bodies) in route_calls(settings).items():
            if name not in routes:
                continue
            count = min(calls, GENERATING_CALLS) if name in GENERATING else calls
            report["routes"][name] = timed_calls(url, path, bodies, count, settings.api_token)
    for measured in (kserve, *report["routes"].values()):
        measured["over_floor"] = round(measured["p99_ms"] / floor["p99_ms"], 2)
    report["within_target"] = {
        name: report["routes"][name]["over_floor"] <= TARGET_OVER_FLOOR
        for name in CACHED_OR_IN_MEMORY
        if name in routes
    }
    report["online_lookup"] = {
        "sqlite": lookup_figures(settings, calls),
        "redis": redis_lookup_figures(settings, redis_url, calls),
    }
    return report


def print_table(report: dict[str, Any]) -> None:
    rows = {
        "bare FastAPI echo": report["floor"]["fastapi_echo"],
        "bare KServe echo": report["floor"]["kserve_echo"],
        **report["routes"],
        **{f"online lookup ({k})": v for k, v in report["online_lookup"].items()},
    }
    for name, row in rows.items():
        over = row.get("over_floor", "")
        print(
            f"[bench] {name:<24} p50 {row['p50_ms']:>8.3f} ms  p99 {row['p99_ms']:>8.3f} ms"
            f"  {over}",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--redis", default="127.0.0.1:6379", help="Feast's Redis connection")
    parser.add_argument(
        "--routes",
        default=",".join(ROUTE_FAMILIES),
        help="comma-separated routes to time (default: all)",
    )
    parser.add_argument("--echo", choices=sorted(ECHOES), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo:  # a child: one of the floors
        ECHOES[args.echo](args.port)
        return 0
    routes = comma_list(args.routes)
    unknown = sorted(set(routes) - set(ROUTE_FAMILIES))
    if args.calls < 1 or unknown or not routes:
        parser.error(
            f"--calls must be at least 1; unknown routes {unknown}; known {list(ROUTE_FAMILIES)}"
        )
    report = run(Settings.from_env(), args.calls, args.redis, routes)
    print_table(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
