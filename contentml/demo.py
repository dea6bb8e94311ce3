"""`make demo`: the whole platform loop on this machine, printing what happens as it goes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from contentml import pipelines, registry
from contentml.settings import Settings
from serving.client import ContentMLClient

READY_TIMEOUT_SECONDS = 120.0
"""Loading the champion (MLflow, Feast, Prophet imports) takes seconds, not minutes."""


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def model_server(settings: Settings, port: int, *serve_args: str) -> Iterator[str]:
    """`contentml serve [SERVE_ARGS]` as a child process, yielded once `/v2/health/ready`
    answers 200."""
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "contentml.cli", "serve", "--port", str(port), *serve_args],
        env={**os.environ, **settings.to_env()},
        stdout=sys.stderr,  # stdout carries only the demo's summary line
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"model server exited with status {process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"model server not ready after {READY_TIMEOUT_SECONDS} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_demo(settings: Settings, max_series: int = 24) -> dict:
    started = time.monotonic()
    _say(f"state folder: {settings.home}")
    _say(f"running the training pipeline through kfp.local on {max_series} topic series")
    decision = pipelines.run_local(settings, "training", {"max_series": max_series})
    _say(f"promotion gate: {decision['reason']}")

    client = registry.connect(settings)
    models = {
        m["name"]: {"versions": [v["version"] for v in m["versions"]], "aliases": m["aliases"]}
        for m in registry.list_models(client)
    }
    _say(f"registry: {models}")

    port = free_port()
    _say(f"starting the model server on port {port}")
    with model_server(settings, port) as url, ContentMLClient(url) as serving:
        series_id = "H1"
        by_id = serving.predict_trend(series_id=series_id, horizon=48)
        _say(
            f"trend {series_id}: {by_id['direction']} over 48 h ({by_id['source']}, "
            f"v{by_id['model_version']}), first hours {[round(v) for v in by_id['forecast'][:4]]}"
        )
        by_history = serving.predict_trend(history=by_id["forecast"] * 2, horizon=24)
        _say(f"trend from a raw history: {by_history['direction']} ({by_history['source']})")
    return {
        "pipeline": "training",
        "models": models,
        "endpoint": f"{url}/v1/models/trend:predict",
        "trend_forecast_points": len(by_id["forecast"]),
        "seconds": round(time.monotonic() - started, 1),
    }
