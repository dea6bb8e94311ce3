"""Admission control (`serving/admission.py`): the bearer token, the limit of requests in flight
per model and route, and draining on SIGTERM. The middleware on a bare app in-process; the
drain on a real `contentml serve`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import psutil
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from timing_asgi import TimingClient, TimingMiddleware

from contentml.errors import UserError
from contentml.settings import SettingsError
from entrypoints.demo import READY_TIMEOUT_SECONDS, free_port
from serving.admission import (
    BINARY_HEADER,
    MAX_BODY_BYTES,
    MAX_JSON_DEPTH,
    Admission,
    AdmissionMiddleware,
    bind_host,
    json_depth,
)
from serving.backend.batch.routes import MAX_BATCH_BODY_BYTES
from serving.backend.tasks import MAX_BODY_BYTES as MAX_TASK_BODY_BYTES
from serving.model_server.revenue import MAX_BODY_BYTES as MAX_REWARDS_BODY
from serving.server import MAX_MODEL_BODY_BYTES, ServedModels, finish_app
from tests.conftest import make_settings

TOKEN = "s3cret-Token_1"
ADMIN = "4dmin-Token_2"
PREDICT = "/v1/models/{model}:predict"
FIXED = {"/predict/trend": "trend"}


def app_with(admission: Admission, gate: asyncio.Event | None = None) -> Starlette:
    """Health, /metrics, a V1 predict route and a task route; `trend` predictions wait for
    `gate`, so a test holds them in flight."""

    async def predict(request: Request) -> JSONResponse:
        if gate is not None and request.path_params["name"] == "trend":
            await gate.wait()
        return JSONResponse({"predictions": [1.0]})

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    routes = [
        Route("/v1/models/{name}:predict", predict, methods=["POST"]),
        Route("/v1/models/{name}", ok),
        Route("/predict/trend", ok, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", ok, methods=["POST"]),
        Route("/v1/channels/{channel:path}/quarantine", ok, methods=["POST", "DELETE"]),
        Route("/v1/channels/{channel:path}", ok),
        Route("/v1/experiments/{name}/rewards", ok, methods=["POST"]),
        Route("/batch/jobs", ok),
        Route("/v2/health/ready", ok),
        Route("/metrics", ok),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(AdmissionMiddleware, admission=admission)
    return app


def rejected(model: str, route: str) -> float:
    labels = {"model": model, "route": route}
    return REGISTRY.get_sample_value("contentml_requests_rejected_total", labels) or 0.0


@pytest.mark.parametrize(
    ("method", "path", "pool"),
    [
        ("POST", "/v1/models/trend:predict", (PREDICT, "trend")),
        ("POST", "/v2/models/quality/infer", ("/v2/models/{model}/infer", "quality")),
        (
            "POST",
            "/v2/models/trend/versions/3/infer",
            ("/v2/models/{model}/versions/{version}/infer", "trend"),
        ),
        ("POST", "/predict/trend", ("/predict/trend", "trend")),
        ("POST", "/v1/models/made-up:predict", None),  # KServe answers 404: no pool, no label
        ("GET", "/v1/models/trend", None),
        ("POST", "/v1/experiments/e/rewards", None),
    ],
)
def test_each_model_route_has_its_own_pool(method: str, path: str, pool) -> None:
    admission = Admission(2, models=frozenset({"trend", "quality"}), fixed_routes=FIXED)
    assert admission.pool(method, path) == pool


def test_a_request_over_the_limit_gets_429_with_retry_after_at_once() -> None:
    admission = Admission(2, models=frozenset({"trend", "quality"}))
    before = rejected("trend", PREDICT)

    async def scenario() -> tuple[list[int], httpx.Response, float, int, int]:
        gate = asyncio.Event()
        transport = httpx.ASGITransport(app_with(admission, gate))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = [
                asyncio.create_task(client.post("/v1/models/trend:predict", json={}))
                for _ in range(2)
            ]
            while sum(admission.in_flight.values()) < 2:
                await asyncio.sleep(0.001)
            start = time.perf_counter()
            refused = await client.post("/v1/models/trend:predict", json={})
            elapsed = time.perf_counter() - start
            other = await client.post("/v1/models/quality:predict", json={})  # its own pool
            gate.set()
            answered = [r.status_code for r in await asyncio.gather(*held)]
            again = await client.post("/v1/models/trend:predict", json={})
            return answered, refused, elapsed, other.status_code, again.status_code

    answered, refused, elapsed, other, again = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "trend" in refused.json()["error"]
    assert elapsed < 0.05
    assert answered == [200, 200] and other == 200 and again == 200
    assert not admission.in_flight
    assert rejected("trend", PREDICT) == before + 1


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/v1/models/trend:predict", {}, 401),
        ("POST", "/v1/models/trend:predict", {"Authorization": "Bearer wrong-token"}, 401),
        ("POST", "/v1/models/trend:predict", {"Authorization": TOKEN}, 401),
        ("POST", "/v1/models/trend:predict", {"Authorization": f"Bearer {TOKEN}"}, 200),
        ("POST", "/v1/models/trend:predict", {"Authorization": f"bearer {TOKEN}"}, 200),
        ("POST", "/predict/trend", {"Authorization": "Bearer wrong-token"}, 401),
        ("GET", "/v1/models/trend", {}, 401),
        ("GET", "/v2/health/ready", {}, 200),
        ("GET", "/metrics", {}, 200),
    ],
)
def test_with_a_token_only_health_and_metrics_are_open(method, path, headers, status) -> None:
    admission = Admission(2, token=TOKEN, models=frozenset({"trend"}), fixed_routes=FIXED)
    with TestClient(app_with(admission)) as client:
        answer = client.request(method, path, headers=headers)
    assert answer.status_code == status
    if status == 401:
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert "wrong-token" not in answer.text and TOKEN not in answer.text


ADMIN_CALLS = [
    ("POST", "/v2/repository/models/trend/unload"),
    ("POST", "/v1/channels/ch_a/quarantine"),
    ("DELETE", "/v1/channels/ch_a/quarantine"),
    ("POST", "/v1/experiments/e/rewards"),
    ("GET", "/batch/jobs"),
]
CALLER_CALLS = [("POST", "/predict/trend"), ("GET", "/v1/channels/ch_a")]


def _call(admission: Admission, method: str, path: str, token: str | None) -> int:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with TestClient(app_with(admission)) as client:
        return client.request(method, path, headers=headers).status_code


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
def test_admin_routes_need_the_admin_token_not_the_callers(method, path) -> None:
    both = Admission(2, token=TOKEN, admin_token=ADMIN, models=frozenset({"trend"}))
    assert _call(both, method, path, None) == 401
    assert _call(both, method, path, "wrong-token") == 401
    assert _call(both, method, path, TOKEN) == 403
    assert _call(both, method, path, ADMIN) == 200
    # Without an admin token the admin routes are closed wherever callers need a token...
    callers_only = Admission(2, token=TOKEN, models=frozenset({"trend"}))
    assert _call(callers_only, method, path, TOKEN) == 403
    # ...and an admin token alone guards them, the callers' routes staying open.
    admin_only = Admission(2, admin_token=ADMIN, models=frozenset({"trend"}))
    assert _call(admin_only, method, path, None) == 401
    assert _call(admin_only, method, path, ADMIN) == 200


@pytest.mark.parametrize(("method", "path"), CALLER_CALLS)
def test_callers_routes_take_either_token(method, path) -> None:
    both = Admission(2, token=TOKEN, admin_token=ADMIN, models=frozenset({"trend"}))
    assert _call(both, method, path, None) == 401
    assert _call(both, method, path, TOKEN) == 200
    assert _call(both, method, path, ADMIN) == 200
    assert _call(Admission(2, admin_token=ADMIN), method, path, None) == 200


def test_the_admin_token_must_differ_from_the_callers(tmp_path) -> None:
    with pytest.raises(SettingsError, match="must differ") as raised:
        make_settings(tmp_path, CONTENTML_API_TOKEN=TOKEN, CONTENTML_ADMIN_TOKEN=TOKEN)
    assert TOKEN not in str(raised.value)


@pytest.mark.parametrize(
    ("api_token", "host", "insecure", "bound"),
    [
        ("", None, False, "127.0.0.1"),
        (TOKEN, None, False, "0.0.0.0"),
        ("", "127.0.0.1", False, "127.0.0.1"),
        ("", "::1", False, "::1"),
        ("", "localhost", False, "localhost"),
        (TOKEN, "10.1.2.3", False, "10.1.2.3"),
        ("", "0.0.0.0", True, "0.0.0.0"),
        ("", "0.0.0.0", False, None),
        ("", "10.1.2.3", False, None),
        ("", "example.com", False, None),
    ],
)
def test_a_server_without_a_token_listens_on_loopback_only(
    tmp_path, api_token, host, insecure, bound
) -> None:
    settings = make_settings(tmp_path, CONTENTML_API_TOKEN=api_token)
    if bound is None:
        with pytest.raises(UserError, match="without a token.*--insecure"):
            bind_host(settings, host, insecure)
    else:
        assert bind_host(settings, host, insecure) == bound


@pytest.mark.parametrize(
    ("command", "refusal"),
    [
        (["serve"], "refusing to listen on 0.0.0.0 without a token"),
        (["api"], "refusing to listen on 0.0.0.0 without a token"),
        # Feast's server has no token to set: beyond loopback only when told --insecure.
        (["features", "serve"], "refusing to serve the feature store on 0.0.0.0"),
    ],
)
def test_the_servers_refuse_to_listen_beyond_loopback_without_a_token(
    tmp_path, command, refusal
) -> None:
    settings = make_settings(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", *command, "--host", "0.0.0.0", "--port", "1"],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert refusal in result.stderr


def test_a_token_that_can_never_match_is_refused_without_quoting_it(tmp_path) -> None:
    with pytest.raises(SettingsError) as raised:
        make_settings(tmp_path, CONTENTML_API_TOKEN="two words")
    assert "two words" not in str(raised.value)


@pytest.mark.parametrize(
    ("method", "path", "problem"),
    [
        ("POST", "/v1/models/..:predict", "'..'"),
        ("POST", "/v1/models/.hidden:predict", "starting with a letter or digit"),
        ("GET", "/v1/models/%00", "model name"),
        ("POST", "/v2/models/trend/versions/%2e%2e/infer", "version"),
        ("POST", "/v2/models/trend/versions/" + "9" * 5_000 + "/infer", "(5000 characters)"),
        ("GET", "/v2/models/" + "m" * 300 + "/ready", "characters"),
        ("POST", "/v2/repository/models/a..b/load", "'..'"),
        ("GET", "/v1/channels/a%2Fb", "channel id 'a/b'"),
        ("POST", "/v1/channels/x/y/quarantine", "channel id 'x/y'"),
        ("POST", "/v1/experiments/..%2Fetc/rewards", "experiment name '../etc'"),
        ("GET", "/v1/experiments/a%00/report.html", "experiment name"),
    ],
)
def test_hostile_names_in_paths_are_400(method, path, problem) -> None:
    admission = Admission(2, models=frozenset({"trend"}))
    with TestClient(app_with(admission)) as client:
        answer = client.request(method, path)
    assert answer.status_code == 400
    assert problem in answer.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/trend:predict",
        "/v2/models/trend/versions/3/infer",
        "/v1/models/q-1.b",
        "/v1/channels/ch_a/quarantine",
        "/v1/experiments/hook:v2/report.html",
    ],
)
def test_valid_names_pass(path: str) -> None:
    assert Admission(2).refusal({"type": "http", "method": "POST", "path": path}) is None


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"", 0),
        (b'{"instances": [{"history": [1.0, 2.0]}]}', 4),
        (b'{"text": "[[[{{{ brackets in a string"}', 1),
        (b'["a \\" quote, then [[[ still in the string"]', 1),
        (b'["a backslash \\\\", [[]]]', 3),
        (b'{"a": "' + b"\\" * 1001 + b'"[[["}', 1),  # the last backslash escapes the quote
        (b"[" * 100_000, 100_000),  # malformed: json still recurses into every one
        (b"]]][[", 0),
        (b"[" * 40 + b"]" * 40 + b"[[]]", 40),
        (b'"unterminated [[[', 0),
    ],
)
def test_json_depth_ignores_brackets_in_strings(body: bytes, depth: int) -> None:
    assert json_depth(body) == depth


def test_json_depth_is_linear_on_bodies_that_make_a_regex_quadratic() -> None:
    hostile = b'"' + b'\\"' * 2_000_000  # an escaped quote after another, never closed
    start = time.perf_counter()
    assert json_depth(hostile + b"[[") == 0
    assert time.perf_counter() - start < 2.0


def nested(depth: int) -> bytes:
    return b'{"instances": ' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/models/trend:predict", nested(MAX_JSON_DEPTH + 1)),
        ("/v1/models/trend:predict", b"[" * 100_000),
        ("/predict/trend", b'{"history": ' + b"[" * 5_000),
        ("/v1/experiments/e/rewards", b"[{}, " * 2 + b"[" * 50 + b"]" * 50 + b"]"),
    ],
)
def test_a_body_nested_too_deep_gets_400_before_any_route(path: str, body: bytes) -> None:
    admission = Admission(2, models=frozenset({"trend"}), fixed_routes=FIXED)
    with TestClient(app_with(admission)) as client:
        answer = client.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert f"at most {MAX_JSON_DEPTH} are taken" in answer.json()["error"]
    assert not admission.in_flight


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (nested(MAX_JSON_DEPTH), {}),
        (b'{"text": "' + b"[" * 5_000 + b'"}', {}),
        # V2's binary extension: only the JSON part is JSON, the tensor's bytes may be anything.
        (b'{"inputs": []}' + b"[" * 5_000, {BINARY_HEADER: "14"}),
    ],
)
def test_bodies_within_the_depth_reach_the_route_whole(body: bytes, headers: dict) -> None:
    seen: list[bytes] = []

    async def predict(request: Request) -> JSONResponse:
        seen.append(await request.body())
        return JSONResponse({"predictions": [1.0]})

    app = Starlette(routes=[Route("/v1/models/{name}:predict", predict, methods=["POST"])])
    app.add_middleware(AdmissionMiddleware, admission=Admission(2, models=frozenset({"trend"})))
    with TestClient(app) as client:
        assert client.post("/v1/models/trend:predict", content=body, headers=headers).is_success
    assert seen == [body]


def test_a_body_over_the_read_limit_gets_413() -> None:
    admission = Admission(2, models=frozenset({"trend"}), max_body_bytes=1_000)
    with TestClient(app_with(admission)) as client:
        assert client.post("/v1/models/trend:predict", content=b" " * 1_000).status_code == 200
        answer = client.post("/v1/models/trend:predict", content=b" " * 1_001)
    assert answer.status_code == 413 and "over 1000 bytes" in answer.json()["error"]


def test_the_read_limit_covers_every_routes_own_limit() -> None:
    """A route's own limit must be the one a caller meets: the middleware reads at least as
    much."""
    limits = [MAX_MODEL_BODY_BYTES, MAX_BATCH_BODY_BYTES, MAX_TASK_BODY_BYTES, MAX_REWARDS_BODY]
    assert max(limits) <= MAX_BODY_BYTES


def test_on_kserves_app_admission_is_outermost_and_timing_is_gone() -> None:
    """KServe adds its middlewares when the server starts, after `serve` set up admission."""
    timed: list[str] = []
    passed: list[str] = []

    class Timings(TimingClient):
        def timing(self, metric_name, timing, tags) -> None:
            timed.append(metric_name)

    async def passing(request: Request, call_next):
        passed.append(request.url.path)
        return await call_next(request)

    app = FastAPI()
    app.add_api_route(
        "/v1/models/{name}:predict", lambda name: {"predictions": [1.0]}, methods=["POST"]
    )
    finish_app(app, Admission(1, models=frozenset({"trend"})), ServedModels())
    app.add_middleware(TimingMiddleware, client=Timings())  # as KServe's RESTServer does
    app.middleware("http")(passing)
    with TestClient(app) as client:
        assert client.post("/v1/models/..:predict", json={}).status_code == 400
        assert passed == []  # refused before any other middleware
        assert client.post("/v1/models/trend:predict", json={}).status_code == 200
    assert passed == ["/v1/models/trend:predict"] and timed == []


def test_while_draining_readiness_is_503_and_requests_are_served() -> None:
    admission = Admission(2, models=frozenset({"trend"}), draining=True)
    with TestClient(app_with(admission)) as client:
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v1/models/trend").status_code == 503  # V1's model readiness
        assert client.post("/v1/models/trend:predict", json={}).status_code == 200


# --- SIGTERM on a real server ---------------------------------------------------------------

IN_FLIGHT = 50
DRAIN_SECONDS = 1.0


async def held_rewards(url: str, server: subprocess.Popen) -> tuple[int, int, list[int]]:
    """IN_FLIGHT rewards whose bodies are held half-sent across SIGTERM and the drain (the
    route waits for its whole body: requests stay in flight as long as the test wants, with no
    sleeping route in the product). Returns the statuses of readiness after SIGTERM, of a
    request sent while draining, and of the rewards."""
    release = asyncio.Event()
    half_sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        yield b'{"arm": "a", '
        half_sent.append(1)
        await release.wait()
        yield b'"reward": 1.0}'

    limits = httpx.Limits(max_connections=IN_FLIGHT + 5)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:
        rewards = [
            asyncio.create_task(client.post("/v1/experiments/drain/rewards", content=body()))
            for _ in range(IN_FLIGHT)
        ]
        while len(half_sent) < IN_FLIGHT:
            await asyncio.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        for _ in range(100):
            readiness = (await client.get("/v2/health/ready")).status_code
            if readiness != 200:
                break
            await asyncio.sleep(0.01)
        during = (await client.get("/v1/experiments")).status_code
        # Past the drain the server no longer listens, and still holds the requests.
        await asyncio.sleep(DRAIN_SECONDS + 0.5)
        assert server.poll() is None
        release.set()
        return readiness, during, [r.status_code for r in await asyncio.gather(*rewards)]


def test_sigterm_turns_not_ready_and_finishes_every_request_in_flight(tmp_path) -> None:
    settings = make_settings(
        tmp_path / "state", CONTENTML_SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS)
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["serve", "--models", "revenue", "--workers", "0", "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.cli", *command], env={**os.environ, **settings.to_env()}
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not _ready(url):
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        # No token: it listens on loopback alone.
        listening = psutil.Process(server.pid).connections("tcp")
        assert {c.laddr for c in listening if c.status == psutil.CONN_LISTEN} == {
            ("127.0.0.1", port)
        }
        choose = {"instances": [{"experiment": "drain", "arms": ["a", "b"]}]}
        assert httpx.post(f"{url}/v1/models/revenue:predict", json=choose).status_code == 200
        # Hostile model names and oversized bodies are refused before KServe's handlers.
        hostile = httpx.post(f"{url}/v1/models/%2e%2e:predict", json=choose)
        assert hostile.status_code == 400 and "'..'" in hostile.json()["error"]
        # What KServe leaves unimplemented or answers 503 for is 404 here, never 5xx: a model
        # version in the path, :explain, loading a model this server does not serve. A model
        # unloaded is loaded again.
        for method, path in (
            ("GET", "/v2/models/revenue/versions/1/ready"),
            ("POST", "/v1/models/revenue:explain"),
            ("POST", "/v2/repository/models/nope/load"),
        ):
            answer = httpx.request(method, f"{url}{path}", json=choose)
            assert answer.status_code == 404, (path, answer.text)
        assert httpx.post(f"{url}/v2/repository/models/revenue/unload").status_code == 200
        assert httpx.post(f"{url}/v1/models/revenue:predict", json=choose).status_code == 404
        assert httpx.post(f"{url}/v2/repository/models/revenue/load").status_code == 200
        assert httpx.post(f"{url}/v1/models/revenue:predict", json=choose).status_code == 200
        oversized = b"[" + b" " * MAX_MODEL_BODY_BYTES + b"]"
        predict = f"{url}/v1/models/revenue:predict"
        assert httpx.post(predict, content=oversized, timeout=30).status_code == 413

        readiness, during, rewards = asyncio.run(held_rewards(url, server))

        assert readiness == 503 and during == 200
        assert rewards == [200] * IN_FLIGHT
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()


def _ready(url: str) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200
    return False
