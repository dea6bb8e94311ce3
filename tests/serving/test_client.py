"""End-to-end tests of `serving.caller.client`: real HTTP servers on free ports with scripted
answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest

from contentml.protocol import Task
from serving.caller.client import (
    BadResponse,
    ClientError,
    ContentMLClient,
    RetryLater,
    ServerError,
    ServiceUnavailable,
)

# Short deadlines and backoff so failure paths take milliseconds, not the production seconds.
FAST = {"deadlines": {task: 2.0 for task in Task}, "backoff_seconds": 0.01}


@dataclass
class Reply:
    """One scripted answer: a dict body goes out as JSON, a str body as plain text."""

    status: int = 200
    body: dict[str, Any] | str = field(default_factory=dict)
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    body: Any
    headers: dict[str, str]


class ScriptedServer:
    """Answers each POST with the next scripted reply (the last one repeats) and records it."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # A short poll interval makes shutdown() return in milliseconds, not half a second.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers still sleeping out a delay
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _next_reply(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                seen = Seen(self.path, json.loads(raw or b"null"), dict(self.headers))
                reply = server._next_reply(seen)
                if reply.delay and server._stopping.wait(reply.delay):
                    return
                if isinstance(reply.body, str):
                    data, content_type = reply.body.encode(), "text/plain"
                else:
                    data, content_type = json.dumps(reply.body).encode(), "application/json"
                self.send_response(reply.status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    """Start a scripted server per call; all are stopped after the test."""
    servers: list[ScriptedServer] = []

    def start(*replies: Reply) -> ScriptedServer:
        servers.append(ScriptedServer(list(replies)).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def closed_port_url() -> str:
    """A URL nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def chat_completion(content: str) -> dict[str, Any]:
    """An OpenAI chat-completions answer, as KServe's OpenAI routes send it."""
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "script",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


@dataclass(frozen=True)
class Route:
    """How each client method is called, where it posts, and a good answer to it."""

    call: Callable[[ContentMLClient], Any]
    path: str
    ok: dict[str, Any]
    expected: Any


ROUTES = {
    Task.TREND: Route(
        call=lambda c: c.predict_trend(series_id="chan-1"),
        path="/v1/models/trend:predict",
        ok={"predictions": [{"forecast": [1.0, 2.0]}]},
        expected={"forecast": [1.0, 2.0]},
    ),
    Task.QUALITY: Route(
        call=lambda c: c.score_quality("a script"),
        path="/v1/models/quality:predict",
        ok={"predictions": [{"score": 0.9, "label": "good"}]},
        expected={"score": 0.9, "label": "good"},
    ),
    Task.SCRIPT: Route(
        call=lambda c: c.generate_script("volcanoes", "Upbeat science channel."),
        path="/openai/v1/chat/completions",
        ok=chat_completion("Welcome back!"),
        expected="Welcome back!",
    ),
}


def test_default_deadlines_are_the_roadmaps() -> None:
    assert dict(ContentMLClient.DEADLINES) == {
        Task.TREND: 5.0,
        Task.QUALITY: 2.0,
        Task.SCRIPT: 30.0,
    }


def test_predict_trend_by_series_id(serve) -> None:
    server = serve(Reply(body={"predictions": [{"forecast": [3.0] * 4, "lower": [1.0] * 4}]}))
    with ContentMLClient(server.url) as client:
        prediction = client.predict_trend(series_id="chan-7", horizon=4)
    assert prediction == {"forecast": [3.0] * 4, "lower": [1.0] * 4}
    [seen] = server.requests
    assert seen.path == "/v1/models/trend:predict"
    assert seen.body == {"instances": [{"series_id": "chan-7", "horizon": 4}]}


def test_predict_trend_from_history(serve) -> None:
    server = serve(Reply(body={"predictions": [{"forecast": [5.0, 6.0]}]}))
    with ContentMLClient(server.url) as client:
        prediction = client.predict_trend(history=[1, 2.5, 4], horizon=2)
    assert prediction["forecast"] == [5.0, 6.0]
    assert server.requests[0].body == {"instances": [{"history": [1.0, 2.5, 4.0], "horizon": 2}]}


def test_score_quality(serve) -> None:
    server = serve(Reply(body={"predictions": [{"score": 0.25}]}))
    with ContentMLClient(server.url) as client:
        assert client.score_quality("hello", kind="title") == {"score": 0.25}
    [seen] = server.requests
    assert seen.path == "/v1/models/quality:predict"
    assert seen.body == {"instances": [{"text": "hello", "kind": "title"}]}


def test_generate_script(serve) -> None:
    server = serve(Reply(body=chat_completion("Today: volcanoes.")))
    with ContentMLClient(server.url) as client:
        script = client.generate_script("volcanoes", "Upbeat science channel.", max_tokens=64)
    assert script == "Today: volcanoes."
    [seen] = server.requests
    assert seen.path == "/openai/v1/chat/completions"
    assert seen.body["model"] == "script"
    assert seen.body["max_tokens"] == 64
    system, user = seen.body["messages"]
    assert system["role"] == "system" and "Upbeat science channel." in system["content"]
    assert user["role"] == "user" and "volcanoes" in user["content"]


def test_api_key_is_sent_as_bearer_token(serve) -> None:
    server = serve(Reply(body={"predictions": [{"score": 1.0}]}))
    with ContentMLClient(server.url, api_key="s3cret") as client:
        client.score_quality("x")
    assert server.requests[0].headers["Authorization"] == "Bearer s3cret"


@pytest.mark.parametrize("task", list(Task))
def test_5xx_is_retried_until_success(serve, task: Task) -> None:
    route = ROUTES[task]
    server = serve(
        Reply(503, {"error": "warming up"}), Reply(502, "bad gateway"), Reply(body=route.ok)
    )
    with ContentMLClient(server.url, **FAST) as client:
        assert route.call(client) == route.expected
    assert len(server.requests) == 3
    assert {seen.path for seen in server.requests} == {route.path}


@pytest.mark.parametrize("task", list(Task))
@pytest.mark.parametrize("status", [400, 404, 429])
def test_4xx_is_client_error_after_one_request(serve, task: Task, status: int) -> None:
    server = serve(Reply(status, {"error": "horizon too long"}), Reply(body=ROUTES[task].ok))
    with ContentMLClient(server.url, **FAST) as client:
        with pytest.raises(ClientError) as raised:
            ROUTES[task].call(client)
    assert raised.value.status_code == status
    assert raised.value.message == "horizon too long"
    assert len(server.requests) == 1


@pytest.mark.parametrize("task", list(Task))
@pytest.mark.parametrize("status", [429, 503])
def test_busy_server_with_retry_after_is_retried(serve, task: Task, status: int) -> None:
    busy = Reply(status, {"error": "at its limit"}, headers={"Retry-After": "0"})
    server = serve(busy, Reply(body=ROUTES[task].ok))
    with ContentMLClient(server.url, **FAST) as client:
        assert ROUTES[task].call(client) == ROUTES[task].expected
    assert len(server.requests) == 2


def test_retry_after_is_waited_for(serve) -> None:
    server = serve(Reply(429, headers={"Retry-After": "1"}), Reply(body=ROUTES[Task.QUALITY].ok))
    with ContentMLClient(server.url, backoff_seconds=0.01, deadlines={"quality": 3.0}) as client:
        start = time.monotonic()
        client.score_quality("x")
    assert time.monotonic() - start >= 1.0
    assert len(server.requests) == 2


# Retry-After's two forms, a minute from when the test runs.
A_MINUTE = {"seconds": lambda: "60", "http-date": lambda: formatdate(time.time() + 60, usegmt=True)}


@pytest.mark.parametrize("task", list(Task))
@pytest.mark.parametrize("form", list(A_MINUTE))
def test_retry_after_past_the_deadline_gives_up_at_once(serve, task: Task, form: str) -> None:
    server = serve(Reply(503, {"error": "draining"}, headers={"Retry-After": A_MINUTE[form]()}))
    with ContentMLClient(server.url, **FAST) as client:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable) as raised:
            ROUTES[task].call(client)
    assert time.monotonic() - start < 0.5
    assert len(server.requests) == 1
    cause = raised.value.__cause__
    assert isinstance(cause, RetryLater) and 55 <= cause.retry_after <= 60
    assert "retry after" in str(raised.value) and "draining" in str(raised.value)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"error": {"message": "model not found", "type": "invalid_request_error"}},
            "model not found",
        ),
        ("plain text refusal", "plain text refusal"),
    ],
)
@pytest.mark.parametrize("task", list(Task))
def test_client_error_message_shapes(serve, task: Task, body: Any, message: str) -> None:
    server = serve(Reply(400, body))
    with ContentMLClient(server.url, **FAST) as client:
        with pytest.raises(ClientError) as raised:
            ROUTES[task].call(client)
    assert raised.value.message == message


@pytest.mark.parametrize("task", list(Task))
def test_persistent_5xx_is_service_unavailable_after_all_retries(serve, task: Task) -> None:
    server = serve(Reply(500, {"error": "CUDA out of memory"}))
    with ContentMLClient(server.url, retries=2, **FAST) as client:
        with pytest.raises(ServiceUnavailable) as raised:
            ROUTES[task].call(client)
    assert len(server.requests) == 3
    assert raised.value.attempts == 3
    cause = raised.value.__cause__
    assert isinstance(cause, ServerError)
    assert (cause.status_code, cause.message) == (500, "CUDA out of memory")


@pytest.mark.parametrize(
    "task, cause_type",
    [
        (Task.TREND, httpx.ConnectError),
        (Task.QUALITY, httpx.ConnectError),
        (Task.SCRIPT, openai.APIConnectionError),
    ],
)
def test_connection_refused_is_service_unavailable(closed_port_url, task, cause_type) -> None:
    with ContentMLClient(closed_port_url, retries=2, **FAST) as client:
        with pytest.raises(ServiceUnavailable) as raised:
            ROUTES[task].call(client)
    assert raised.value.attempts == 3
    assert isinstance(raised.value.__cause__, cause_type)


@pytest.mark.parametrize("task", list(Task))
def test_slow_server_ends_the_call_at_the_deadline(serve, task: Task) -> None:
    deadline = 0.4
    server = serve(Reply(body=ROUTES[task].ok, delay=5.0))
    with ContentMLClient(server.url, deadlines={task: deadline}, backoff_seconds=0.01) as client:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable) as raised:
            ROUTES[task].call(client)
        elapsed = time.monotonic() - start
    assert deadline * 0.9 <= elapsed < deadline + 0.5
    assert isinstance(raised.value.__cause__, httpx.TimeoutException | openai.APITimeoutError)


def test_deadline_stops_retries_before_they_run_out(serve) -> None:
    server = serve(Reply(503, {"error": "busy"}, delay=0.15))
    client = ContentMLClient(
        server.url, retries=50, backoff_seconds=0.01, deadlines={"quality": 0.5}
    )
    with client:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable) as raised:
            client.score_quality("x")
        elapsed = time.monotonic() - start
    assert elapsed < 0.9
    assert 2 <= raised.value.attempts == len(server.requests) < 51


@pytest.mark.parametrize(
    "body",
    [
        "<html>oops</html>",
        {"outputs": [1.0]},
        {"predictions": []},
        {"predictions": [0.5]},
    ],
)
@pytest.mark.parametrize("task", [Task.TREND, Task.QUALITY])
def test_malformed_prediction_is_bad_response_not_retried(serve, task: Task, body: Any) -> None:
    server = serve(Reply(body=body))
    with ContentMLClient(server.url, **FAST) as client:
        with pytest.raises(BadResponse):
            ROUTES[task].call(client)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        "not json at all",
        {"id": "x", "object": "chat.completion", "choices": []},
        {**chat_completion(""), "choices": [{"index": 0, "message": {"role": "assistant"}}]},
    ],
)
def test_malformed_completion_is_bad_response_not_retried(serve, body: Any) -> None:
    server = serve(Reply(body=body))
    with ContentMLClient(server.url, **FAST) as client:
        with pytest.raises(BadResponse):
            ROUTES[Task.SCRIPT].call(client)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"series_id": "chan-1", "history": [1.0, 2.0]},
        {"series_id": "chan-1", "horizon": 0},
    ],
)
def test_predict_trend_validates_arguments(closed_port_url, kwargs) -> None:
    with ContentMLClient(closed_port_url) as client:
        with pytest.raises(ValueError):
            client.predict_trend(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"deadlines": {"translate": 1.0}},
        {"deadlines": {Task.TREND: 0}},
        {"retries": -1},
        {"backoff_seconds": -0.1},
    ],
)
def test_client_validates_settings(kwargs) -> None:
    with pytest.raises(ValueError):
        ContentMLClient("http://127.0.0.1:8080", **kwargs)


def test_deadline_overrides_keep_other_defaults() -> None:
    with ContentMLClient("http://127.0.0.1:8080", deadlines={"trend": 1.5}) as client:
        assert client.deadlines[Task.TREND] == 1.5
        assert client.deadlines[Task.QUALITY] == ContentMLClient.DEADLINES[Task.QUALITY]


def test_closed_client_refuses_calls(serve) -> None:
    server = serve(Reply(body={"predictions": [{"score": 1.0}]}))
    with ContentMLClient(server.url) as client:
        client.score_quality("x")
    with pytest.raises(RuntimeError):
        client.score_quality("x")
    assert len(server.requests) == 1
