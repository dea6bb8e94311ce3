"""The token check in front of the `script` predictor (`serving/auth_proxy.py`), end to end:
the proxy under uvicorn on a loopback port, in front of a real HTTP server standing in for
KServe's Hugging Face runtime, called over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from contentml.errors import UserError
from entrypoints.cli import build_parser
from entrypoints.demo import free_port
from serving.admission import UNAUTHORIZED
from serving.auth_proxy import auth_proxy_app, predictor_url, run_auth_proxy
from tests.conftest import make_settings
from tests.helpers.live import served

TOKEN = "proxy-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_SECONDS = 2
"""The proxy's read timeout here (CONTENTML_SCRIPT_TIMEOUT_SECONDS)."""
SLOW_SECONDS = TIMEOUT_SECONDS + 2
"""How long the stand-in's slow route takes: past the proxy's timeout."""
GATE_SECONDS = 10
"""How long the stand-in waits for the caller to have read the first event."""


class Predictor:
    """A stand-in for the predictor: records every request it gets and answers like vLLM's
    OpenAI routes (a JSON completion, or server-sent events held after the first until the
    caller has read it), or echoes what it got."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.first_read = threading.Event()
        self.app = FastAPI()
        self.app.add_api_route(
            "/openai/v1/chat/completions", self.chat, methods=["POST"], response_model=None
        )
        self.app.add_api_route("/slow", self.slow, methods=["GET"])
        self.app.add_api_route(
            "/{path:path}", self.echo, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]
        )

    async def _record(self, request: Request) -> dict[str, Any]:
        seen = {
            "method": request.method,
            "path": request.url.path,
            "raw_path": request.scope["raw_path"].decode(),
            "query": request.scope["query_string"].decode(),
            "headers": dict(request.headers),
            "body": (await request.body()).decode(),
        }
        self.seen.append(seen)
        return seen

    async def echo(self, request: Request) -> JSONResponse:
        seen = await self._record(request)
        return JSONResponse(seen, status_code=201, headers={"X-Predictor": "stand-in"})

    async def slow(self, request: Request) -> JSONResponse:
        await self._record(request)
        await asyncio.sleep(SLOW_SECONDS)
        return JSONResponse({"late": True})

    async def chat(self, request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        await self._record(request)
        if not body.get("stream"):
            return JSONResponse({"choices": [{"message": {"content": "a script"}}]})

        async def events() -> Any:
            yield b'data: {"delta": "first"}\n\n'
            read = await asyncio.to_thread(self.first_read.wait, GATE_SECONDS)
            yield b'data: {"delta": "second"}\n\n' if read else b"data: held back\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def predictor() -> Iterator[tuple[Predictor, str]]:
    stand_in = Predictor()
    with served(stand_in.app) as url:
        yield stand_in, url


@pytest.fixture(scope="module")
def proxy(predictor, tmp_path_factory) -> Iterator[str]:
    stand_in, url = predictor
    settings = make_settings(
        tmp_path_factory.mktemp("proxy"),
        CONTENTML_API_TOKEN=TOKEN,
        CONTENTML_SCRIPT_TIMEOUT_SECONDS=str(TIMEOUT_SECONDS),
    )
    with served(auth_proxy_app(settings, url.removeprefix("http://"))) as proxy_url:
        yield proxy_url


@pytest.fixture
def stand_in(predictor) -> Predictor:
    stand_in, _ = predictor
    stand_in.seen.clear()
    stand_in.first_read.clear()
    return stand_in


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ],
    ids=["none", "wrong", "longer", "not-bearer", "no-scheme"],
)
def test_without_the_token_nothing_reaches_the_predictor(proxy, stand_in, headers):
    for method, path in [
        ("POST", "/openai/v1/chat/completions"),
        ("GET", "/openai/v1/models"),
        ("POST", "/v1/models/script:predict"),
    ]:
        answer = httpx.request(
            method, f"{proxy}{path}", headers=headers, json={"messages": []}, timeout=10
        )
        assert answer.status_code == 401, (path, answer.text)
        assert answer.json() == {"error": UNAUTHORIZED}
        assert answer.headers["www-authenticate"] == "Bearer"
    assert stand_in.seen == []


def test_with_the_token_the_request_goes_on_as_it_came(proxy, predictor, stand_in):
    _, predictor_address = predictor
    answer = httpx.put(
        f"{proxy}/some/path%2Fencoded/x?b=2&a=%20one&a=two",
        content=b'{"prompt": "hello"}',
        headers={**AUTH, "Content-Type": "application/json", "X-Request-Id": "r-1"},
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    assert answer.headers["x-predictor"] == "stand-in"
    seen = answer.json()
    assert seen["method"] == "PUT"
    assert seen["raw_path"] == "/some/path%2Fencoded/x"
    assert seen["query"] == "b=2&a=%20one&a=two"
    assert seen["body"] == '{"prompt": "hello"}'
    headers = seen["headers"]
    assert headers["x-request-id"] == "r-1"
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(seen["body"]))
    # The token stops at the proxy; the Host is the predictor's (Knative's gateway routes by it).
    assert "authorization" not in headers
    assert headers["host"] == predictor_address.removeprefix("http://")
    assert stand_in.seen == [seen]


@pytest.mark.parametrize("method", ["GET", "DELETE", "POST"])
def test_each_method_and_the_predictors_status_come_back(proxy, stand_in, method):
    answer = httpx.request(method, f"{proxy}/v2/models/script", headers=AUTH, timeout=10)
    assert answer.status_code == 201
    assert answer.json()["method"] == method


def test_a_chat_completion_goes_through(proxy, stand_in):
    answer = httpx.post(
        f"{proxy}/openai/v1/chat/completions",
        json={"model": "script", "messages": [{"role": "user", "content": "hi"}]},
        headers=AUTH,
        timeout=10,
    )
    assert answer.status_code == 200
    assert answer.json() == {"choices": [{"message": {"content": "a script"}}]}
    (seen,) = stand_in.seen
    assert seen["method"] == "POST" and seen["path"] == "/openai/v1/chat/completions"


def test_server_sent_events_arrive_as_the_predictor_sends_them(proxy, stand_in):
    """The predictor sends its second event only once the caller has the first: a proxy that
    buffered the answer would hold the first back, and the predictor the second."""
    request = {"model": "script", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", f"{proxy}/openai/v1/chat/completions", json=request, headers=AUTH, timeout=30
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        chunks = answer.iter_raw()
        first = next(chunks)
        assert first == b'data: {"delta": "first"}\n\n'
        stand_in.first_read.set()
        rest = b"".join(chunks)
    assert rest == b'data: {"delta": "second"}\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready"])
def test_the_health_routes_need_no_token_and_stay_here(proxy, stand_in, path):
    answer = httpx.get(f"{proxy}{path}", timeout=10)
    assert answer.status_code == 200
    assert stand_in.seen == []


def test_a_predictor_that_is_not_there_is_a_bad_gateway(tmp_path):
    settings = make_settings(tmp_path, CONTENTML_API_TOKEN=TOKEN)
    nowhere = f"127.0.0.1:{free_port()}"
    with served(auth_proxy_app(settings, nowhere)) as proxy:
        answer = httpx.post(f"{proxy}/openai/v1/chat/completions", json={}, headers=AUTH)
    assert answer.status_code == 502
    message = answer.json()["error"]
    assert message.startswith(f"the script predictor at http://{nowhere}/ cannot be reached")
    assert "ConnectError" in message


def test_a_predictor_that_does_not_answer_in_time_is_a_gateway_timeout(proxy, stand_in):
    started = time.monotonic()
    answer = httpx.get(f"{proxy}/slow", headers=AUTH, timeout=30)
    assert answer.status_code == 504
    assert f"did not answer within {float(TIMEOUT_SECONDS)} s" in answer.json()["error"]
    assert time.monotonic() - started < SLOW_SECONDS


def test_it_refuses_to_start_without_a_token(tmp_path):
    settings = make_settings(tmp_path)
    assert settings.api_token == ""
    with pytest.raises(UserError, match="without CONTENTML_API_TOKEN"):
        run_auth_proxy(settings, "script-predictor.contentml", free_port())


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("script-predictor.contentml", "http://script-predictor.contentml/"),
        ("10.0.0.7:8080", "http://10.0.0.7:8080/"),
        ("https://script-predictor.contentml:8443", "https://script-predictor.contentml:8443/"),
    ],
)
def test_the_predictor_host_is_kserves_host_and_port(host, url):
    assert str(predictor_url(host)) == url


@pytest.mark.parametrize("host", ["", "ftp://predictor", "predictor/v1", "user@predictor:80"])
def test_a_malformed_predictor_host_is_refused(host):
    with pytest.raises(UserError, match="is not HOST\\[:PORT\\]"):
        predictor_url(host)


KSERVE_ARGS = ["--model_name", "script", "--predictor_host", "script-predictor.contentml"]
"""What KServe appends to a custom transformer's args (transformer_custom.go), before
`--http_port 8080`."""


def test_the_command_takes_the_arguments_kserve_passes():
    args = build_parser().parse_args(["auth-proxy", *KSERVE_ARGS, "--http_port", "8080"])
    assert (args.predictor_host, args.http_port, args.model_name) == (
        "script-predictor.contentml",
        8080,
        "script",
    )


def test_the_command_serves_the_check_and_refuses_to_start_without_a_token(
    predictor, stand_in, tmp_path
):
    _, url = predictor
    port = free_port()
    command = [sys.executable, "-m", "entrypoints.cli", "auth-proxy"]
    command += ["--model_name", "script", "--predictor_host", url.removeprefix("http://")]
    command += ["--http_port", str(port)]
    environment = {**os.environ, **make_settings(tmp_path).to_env()}
    environment.pop("CONTENTML_API_TOKEN", None)
    refused = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "without CONTENTML_API_TOKEN" in refused.stderr

    server = subprocess.Popen(command, env={**environment, "CONTENTML_API_TOKEN": TOKEN})
    try:
        deadline = time.monotonic() + 60
        while not _ready(f"http://127.0.0.1:{port}"):
            assert server.poll() is None and time.monotonic() < deadline, "it did not start"
            time.sleep(0.1)
        proxied = f"http://127.0.0.1:{port}/openai/v1/models"
        assert httpx.get(proxied).status_code == 401
        assert httpx.get(proxied, headers=AUTH).status_code == 201
        assert [seen["path"] for seen in stand_in.seen] == ["/openai/v1/models"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _ready(url: str) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200
    return False
