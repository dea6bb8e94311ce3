"""The ContentStrategist's `generate_script`: real HTTP through the openai client against fake
OpenAI-compatible providers (an `httpx.MockTransport` per chain; real servers on free ports end
to end and where a provider hangs)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from contentml.protocol import TIMEOUT_HEADER, Task
from contentml.settings import Settings
from serving.backend import tasks
from serving.backend.costs import CostLedger
from serving.caller.client import ClientError, ServiceUnavailable
from serving.caller.provider_errors import NoTimeLeft, RateLimitExhausted
from serving.caller.providers_config import ProviderConfigError, load_config
from serving.caller.rate_limit import SlidingWindowLimit
from serving.caller.strategist import AllProvidersFailed, ContentStrategist, ProviderCosts
from tests.conftest import make_settings
from training.quality.gate import Decision

SERVING_URL = "http://serving.test"
HOSTED_URL = "https://api.hosted.test/v1"
OURS, HOSTED = "serving.test", "api.hosted.test"
DEFAULT_PROVIDERS = (
    Path(__file__).resolve().parents[2] / "serving" / "caller" / "script_providers.yaml"
)

OUR_PROVIDER = {"name": "contentml", "model": "script"}
HOSTED_PROVIDER = {
    "name": "hosted",
    "model": "gpt-4o",
    "base_url": HOSTED_URL,
    "api_key_env": "HOSTED_API_KEY",
    "input_usd_per_million_tokens": 2.5,
    "output_usd_per_million_tokens": 10.0,
}
WITH_KEY = {"HOSTED_API_KEY": "sk-test"}

Reply = Callable[[httpx.Request], httpx.Response]


def completion_body(text: str, prompt: int, completion: int) -> dict[str, Any]:
    """A chat.completion as the OpenAI API answers it, with token usage."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "any",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def ok(text: str = "Hook. Three facts. Call to action.", prompt: int = 100, completion: int = 50):
    body = completion_body(text, prompt, completion)
    return lambda request: httpx.Response(200, json=body)


def status(code: int) -> Reply:
    body = {"error": {"message": f"scripted {code}", "type": "test"}}
    return lambda request: httpx.Response(code, json=body)


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@dataclass
class Seen:
    host: str
    body: dict[str, Any]
    authorization: str
    timeout_header: str | None
    read_timeout: float | None
    """The read timeout the client gave httpx for this request."""


class Backend:
    """Fake providers behind one transport: each host answers with its scripted replies in
    order (the last one repeats), and every request is recorded."""

    def __init__(self, replies: dict[str, list[Reply]]) -> None:
        self.replies = {host: list(answers) for host, answers in replies.items()}
        self.requests: list[Seen] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.requests.append(
            Seen(
                host,
                json.loads(request.content),
                request.headers.get("authorization", ""),
                request.headers.get(TIMEOUT_HEADER),
                request.extensions.get("timeout", {}).get("read"),
            )
        )
        answers = self.replies[host]
        reply = answers.pop(0) if len(answers) > 1 else answers[0]
        return reply(request)

    @property
    def hosts(self) -> list[str]:
        return [seen.host for seen in self.requests]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeQuality:
    """The quality model: a fixed verdict (or an error), and the texts it scored."""

    decision: str = "pass"
    score: float = 0.93
    reasons: list[dict[str, str]] = field(default_factory=list)
    error: Exception | None = None
    texts: list[str] = field(default_factory=list)

    def __call__(self, text: str) -> dict[str, Any]:
        self.texts.append(text)
        if self.error is not None:
            raise self.error
        return {"decision": self.decision, "score": self.score, "reasons": self.reasons}


def chain_settings(
    folder: Path, providers: list[dict[str, Any]], serving_url: str = SERVING_URL, **chain: Any
) -> Settings:
    """Settings whose providers file, written in `folder`, holds `providers`."""
    path = folder / "providers.yaml"
    path.write_text(yaml.safe_dump({"providers": providers, **chain}))
    return make_settings(
        folder / "state", CONTENTML_SCRIPT_PROVIDERS=str(path), CONTENTML_SERVING_URL=serving_url
    )


@pytest.fixture
def build(tmp_path: Path) -> Iterator[Callable[..., ContentStrategist]]:
    """Builds a strategist from a providers file written for the test, through
    `from_settings`, with the backend as transport (None: real HTTP to `serving_url` and the
    providers' `base_url`) and a fake clock and quality model."""
    made: list[ContentStrategist] = []

    def build(
        providers: list[dict[str, Any]],
        backend: Backend | None,
        *,
        environ: dict[str, str] | None = None,
        quality: FakeQuality | None = None,
        clock: FakeClock | None = None,
        serving_url: str = SERVING_URL,
        **chain: Any,
    ) -> ContentStrategist:
        settings = chain_settings(tmp_path, providers, serving_url, **chain)
        strategist = ContentStrategist.from_settings(
            settings,
            environ=environ or {},
            quality=quality or FakeQuality(),
            http_client=None
            if backend is None
            else httpx.Client(transport=httpx.MockTransport(backend)),
            clock=clock or FakeClock(),
        )
        made.append(strategist)
        return strategist

    yield build
    for strategist in made:
        strategist.close()


# --- the chain -------------------------------------------------------------------------------


def test_without_api_key_only_our_endpoint_is_called(build) -> None:
    backend = Backend({HOSTED: [ok()], OURS: [ok("Our script.", 80, 40)]})
    strategist = build([HOSTED_PROVIDER, OUR_PROVIDER], backend)

    script = strategist.generate_script("volcanoes", "Upbeat science for teens.")

    assert backend.hosts == [OURS]
    assert [p.name for p in strategist.providers] == ["contentml"]
    assert (script.text, script.provider, script.model) == ("Our script.", "contentml", "script")
    assert (script.prompt_tokens, script.completion_tokens, script.cost_usd) == (80, 40, 0.0)
    assert not script.cached
    seen = backend.requests[0]
    assert seen.body["model"] == "script"
    assert seen.body["max_tokens"] == 512  # Settings.script_max_tokens
    assert seen.authorization == "Bearer contentml-no-key"
    system, user = seen.body["messages"]
    assert system["role"] == "system" and "Upbeat science for teens." in system["content"]
    assert user["role"] == "user" and "volcanoes" in user["content"]
    assert "60 seconds" in user["content"]


def test_hosted_first_with_key_is_used_and_priced(build) -> None:
    backend = Backend({HOSTED: [ok(prompt=1000, completion=500)], OURS: [ok()]})
    strategist = build([HOSTED_PROVIDER, OUR_PROVIDER], backend, environ=WITH_KEY)

    script = strategist.generate_script(
        "volcanoes", "Upbeat.", target_seconds=30, max_tokens=300, temperature=0.2
    )

    assert backend.hosts == [HOSTED]
    assert backend.requests[0].authorization == "Bearer sk-test"
    assert backend.requests[0].body["model"] == "gpt-4o"
    assert backend.requests[0].body["max_tokens"] == 300
    assert backend.requests[0].body["temperature"] == 0.2
    assert (script.provider, script.model) == ("hosted", "gpt-4o")
    # 1000 * $2.50 / 1M + 500 * $10 / 1M
    assert script.cost_usd == pytest.approx(0.0075)
    assert strategist.costs() == {
        "hosted": ProviderCosts(
            calls=1, prompt_tokens=1000, completion_tokens=500, cost_usd=0.0075
        ),
        "contentml": ProviderCosts(calls=0, prompt_tokens=0, completion_tokens=0, cost_usd=0.0),
    }


@pytest.mark.parametrize(
    "failure", [status(500), status(503), status(429), refused], ids=["500", "503", "429", "down"]
)
def test_hosted_failure_falls_back_to_our_endpoint(build, failure: Reply) -> None:
    backend = Backend({HOSTED: [failure], OURS: [ok("Ours.")]})
    strategist = build([HOSTED_PROVIDER, OUR_PROVIDER], backend, environ=WITH_KEY)

    script = strategist.generate_script("volcanoes", "Upbeat.")

    assert backend.hosts == [HOSTED, OURS]
    assert (script.text, script.provider) == ("Ours.", "contentml")
    assert strategist.costs()["hosted"].calls == 0


@pytest.mark.parametrize("code", [400, 401, 404, 422])
def test_hosted_4xx_is_raised_not_masked(build, code: int) -> None:
    backend = Backend({HOSTED: [status(code)], OURS: [ok()]})
    strategist = build([HOSTED_PROVIDER, OUR_PROVIDER], backend, environ=WITH_KEY)

    with pytest.raises(ClientError) as raised:
        strategist.generate_script("volcanoes", "Upbeat.")

    assert raised.value.status_code == code
    assert raised.value.task is Task.SCRIPT
    assert "hosted" in str(raised.value) and f"scripted {code}" in str(raised.value)
    assert backend.hosts == [HOSTED]


def test_all_providers_failing_lists_each(build) -> None:
    backend = Backend({HOSTED: [status(502)], OURS: [refused]})
    strategist = build([HOSTED_PROVIDER, OUR_PROVIDER], backend, environ=WITH_KEY)

    with pytest.raises(AllProvidersFailed) as raised:
        strategist.generate_script("volcanoes", "Upbeat.")

    assert [name for name, _ in raised.value.failures] == ["hosted", "contentml"]
    message = str(raised.value)
    assert "hosted: HTTP 502" in message
    assert "contentml: APIConnectionError" in message
    assert isinstance(raised.value.failures[1][1].__cause__.__cause__, httpx.ConnectError)


def test_malformed_completion_falls_back(build) -> None:
    empty = ok(text="")
    backend = Backend({HOSTED: [empty], OURS: [ok("Ours.")]})
    strategist = build([HOSTED_PROVIDER, OUR_PROVIDER], backend, environ=WITH_KEY)

    assert strategist.generate_script("volcanoes", "Upbeat.").provider == "contentml"


# --- rate limits -----------------------------------------------------------------------------


def test_requests_per_minute_exhausted_moves_on_then_recovers(build) -> None:
    clock = FakeClock()
    hosted = {**HOSTED_PROVIDER, "requests_per_minute": 2}
    backend = Backend({HOSTED: [ok()], OURS: [ok()]})
    strategist = build([hosted, OUR_PROVIDER], backend, environ=WITH_KEY, clock=clock)

    providers = [strategist.generate_script(f"topic {i}", "Upbeat.").provider for i in range(3)]
    assert providers == ["hosted", "hosted", "contentml"]
    assert backend.hosts == [HOSTED, HOSTED, OURS]  # the limit is ours: no request was sent

    clock.now += 61
    assert strategist.generate_script("topic 3", "Upbeat.").provider == "hosted"


def test_tokens_per_minute_reserve_estimate_then_count_actual_usage(build) -> None:
    clock = FakeClock()
    # Each call reserves its prompt estimate (~45 tokens) + max_tokens 600 = ~645, and then
    # reports 300 used.
    hosted = {**HOSTED_PROVIDER, "tokens_per_minute": 1000}
    backend = Backend({HOSTED: [ok(prompt=100, completion=200)], OURS: [ok()]})
    strategist = build([hosted, OUR_PROVIDER], backend, environ=WITH_KEY, clock=clock)

    def provider(topic: str) -> str:
        return strategist.generate_script(topic, "Upbeat.", max_tokens=600).provider

    assert provider("a") == "hosted"
    # 300 used + ~645 fits 1000 only because the first reservation was corrected to 300.
    assert provider("b") == "hosted"
    assert provider("c") == "contentml"  # 600 used + ~645 does not
    clock.now += 60.5
    assert provider("d") == "hosted"


def test_rate_limit_exhausted_everywhere_is_listed(build) -> None:
    ours = {**OUR_PROVIDER, "requests_per_minute": 1}
    backend = Backend({OURS: [ok()]})
    strategist = build([ours], backend)

    strategist.generate_script("a", "Upbeat.")
    with pytest.raises(AllProvidersFailed) as raised:
        strategist.generate_script("b", "Upbeat.")

    assert isinstance(raised.value.failures[0][1], RateLimitExhausted)
    assert "1 requests in the last minute" in str(raised.value)
    assert backend.hosts == [OURS]


def test_sliding_window_is_thread_safe() -> None:
    limit = SlidingWindowLimit(requests_per_minute=50, tokens_per_minute=None, clock=FakeClock())
    granted = []

    def take() -> None:
        for _ in range(20):
            try:
                granted.append(limit.acquire(1))
            except RateLimitExhausted:
                pass

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 50


# --- cache -----------------------------------------------------------------------------------


def test_cache_hit_within_ttl_needs_no_call_and_costs_nothing(build) -> None:
    clock = FakeClock()
    backend = Backend({HOSTED: [ok(prompt=1000, completion=500)], OURS: [ok()]})
    strategist = build(
        [HOSTED_PROVIDER, OUR_PROVIDER],
        backend,
        environ=WITH_KEY,
        clock=clock,
        cache_ttl_seconds=60,
    )

    first = strategist.generate_script("volcanoes", "Upbeat.")
    clock.now += 59
    again = strategist.generate_script("volcanoes", "Upbeat.")

    assert backend.hosts == [HOSTED]
    assert not first.cached and first.cost_usd > 0
    assert again.cached and again.cost_usd == 0.0
    assert (again.text, again.provider, again.quality_decision) == (
        first.text,
        first.provider,
        first.quality_decision,
    )
    assert strategist.costs()["hosted"].calls == 1


def test_cache_misses_after_ttl_and_for_other_parameters(build) -> None:
    clock = FakeClock()
    backend = Backend({OURS: [ok()]})
    strategist = build([OUR_PROVIDER], backend, clock=clock, cache_ttl_seconds=60)

    strategist.generate_script("volcanoes", "Upbeat.")
    strategist.generate_script("volcanoes", "Upbeat.", max_tokens=100)
    strategist.generate_script("volcanoes", "Calm.")
    clock.now += 60
    late = strategist.generate_script("volcanoes", "Upbeat.")

    assert len(backend.requests) == 4
    assert not late.cached


@pytest.mark.parametrize(
    "quality",
    [
        FakeQuality(decision="reject", score=0.2),
        FakeQuality(error=ServiceUnavailable(Task.QUALITY, 4, 2.0, 2.0, "refused")),
    ],
    ids=["rejected", "unscored"],
)
def test_rejected_or_unscored_script_is_not_cached(build, quality: FakeQuality) -> None:
    backend = Backend({OURS: [ok()]})
    strategist = build([OUR_PROVIDER], backend, quality=quality)

    strategist.generate_script("volcanoes", "Upbeat.")
    second = strategist.generate_script("volcanoes", "Upbeat.")

    assert len(backend.requests) == 2
    assert not second.cached


# --- quality gate ----------------------------------------------------------------------------


def test_quality_decision_is_attached(build) -> None:
    quality = FakeQuality(
        decision="review",
        score=0.7,
        reasons=[{"check": "classifier", "severity": "review", "detail": "score 0.70 below 0.85"}],
    )
    backend = Backend({OURS: [ok("Our script.")]})
    strategist = build([OUR_PROVIDER], backend, quality=quality)

    script = strategist.generate_script("volcanoes", "Upbeat.")

    assert quality.texts == ["Our script."]
    assert script.quality_decision is Decision.REVIEW
    assert script.quality_score == 0.7
    assert script.quality_reasons == ("classifier: score 0.70 below 0.85",)


def test_unreachable_quality_model_sends_script_to_review(build) -> None:
    error = ServiceUnavailable(Task.QUALITY, 4, 2.0, 2.0, "connection refused")
    backend = Backend({OURS: [ok("Our script.")]})
    strategist = build([OUR_PROVIDER], backend, quality=FakeQuality(error=error))

    script = strategist.generate_script("volcanoes", "Upbeat.")

    assert script.text == "Our script."
    assert script.quality_decision is Decision.REVIEW
    assert script.quality_score is None
    assert "quality model unavailable" in script.quality_reasons[0]


# --- arguments and configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"topic": "  ", "channel_persona": "Upbeat."}, "topic"),
        ({"topic": "volcanoes", "channel_persona": ""}, "channel_persona"),
        ({"topic": "volcanoes", "channel_persona": "Upbeat.", "max_tokens": 0}, "max_tokens"),
        ({"topic": "volcanoes", "channel_persona": "Upbeat.", "temperature": 3}, "temperature"),
    ],
)
def test_bad_arguments_are_named(build, kwargs: dict[str, Any], named: str) -> None:
    backend = Backend({OURS: [ok()]})
    strategist = build([OUR_PROVIDER], backend)

    with pytest.raises(ValueError, match=named):
        strategist.generate_script(**kwargs)
    assert backend.requests == []


def test_default_providers_file_is_our_endpoint_only() -> None:
    config = load_config(DEFAULT_PROVIDERS)
    assert [(p.name, p.model, p.base_url, p.api_key_env) for p in config.providers] == [
        ("contentml", "script", None, None)
    ]


def test_hosted_example_in_the_default_file_is_valid(tmp_path: Path) -> None:
    """The commented-out hosted provider loads once uncommented."""
    lines = DEFAULT_PROVIDERS.read_text().splitlines()
    example = [line[1:] for line in lines if line.startswith("#   ")]
    path = tmp_path / "providers.yaml"
    path.write_text("providers:\n" + "\n".join(example))

    (hosted,) = load_config(path).providers
    assert (hosted.name, hosted.model) == ("openai", "gpt-4o")
    assert hosted.base_url == "https://api.openai.com/v1"
    assert hosted.api_key_env == "OPENAI_API_KEY"


@pytest.mark.parametrize(
    ("providers", "message"),
    [
        ([{"name": "ours"}], r"providers\[0\] \(ours\): missing fields \['model'\]"),
        (
            [{**HOSTED_PROVIDER, "output_usd_per_million_tokens": -1}],
            r"providers\[0\] \(hosted\): output_usd_per_million_tokens must be a finite price",
        ),
        (
            [{**OUR_PROVIDER, "requests_per_second": 5}],
            r"providers\[0\] \(contentml\): unknown fields \['requests_per_second'\]",
        ),
        (
            [{**OUR_PROVIDER, "tokens_per_minute": "lots"}],
            r"tokens_per_minute must be int or null, not 'lots'",
        ),
        ([{**OUR_PROVIDER, "requests_per_minute": 0}], r"requests_per_minute must be at least 1"),
        ([{**OUR_PROVIDER, "timeout_seconds": True}], r"timeout_seconds must be float or null"),
        ([{**OUR_PROVIDER, "base_url": "serving:8080"}], r"base_url must start with http"),
        ([{**OUR_PROVIDER, "min_seconds": 0}], r"min_seconds must be positive, not 0"),
        (
            [{**OUR_PROVIDER, "timeout_seconds": 5, "min_seconds": 10}],
            r"min_seconds \(10\) must not exceed timeout_seconds \(5\)",
        ),
        ([OUR_PROVIDER, OUR_PROVIDER], r"repeated names \['contentml'\]"),
        ([], r"providers must be a non-empty list"),
        ("ours", r"providers must be a non-empty list"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path: Path, providers: Any, message: str) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"providers": providers}))

    with pytest.raises(ProviderConfigError, match=message) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("providers: [", "not readable YAML"),
        ("- contentml", "must be a mapping with `providers`"),
        ("cache_ttl_seconds: 5", r"missing fields \['providers'\]"),
        ("providers: [{name: a, model: b}]\ncache_ttl_seconds: -1", "cache_ttl_seconds must be"),
    ],
)
def test_malformed_providers_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    with pytest.raises(ProviderConfigError, match=message) as raised:
        load_config(path)
    assert str(path) in str(raised.value)


def test_missing_providers_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError, match="cannot read the providers file"):
        load_config(tmp_path / "absent.yaml")


def test_chain_of_only_keyed_providers_without_keys_is_refused(build) -> None:
    with pytest.raises(ProviderConfigError, match=r"no usable script provider.*HOSTED_API_KEY"):
        build([HOSTED_PROVIDER], Backend({HOSTED: [ok()]}))


# --- end to end ------------------------------------------------------------------------------


class FakeModelServer:
    """Our model server's two routes the strategist uses, on a free port: the OpenAI chat
    completions (`script`) and the quality model's v1 `:predict`. A hung one reads each
    request and never answers (until `release` is set at teardown)."""

    def __init__(self, hung: bool = False) -> None:
        self.paths: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.paths.append(self.path)
                if hung:
                    server.release.wait()
                    return
                if self.path == "/openai/v1/chat/completions":
                    assert body["model"] == "script"
                    answer: dict[str, Any] = completion_body("Served script.", 60, 20)
                else:
                    assert body == {"instances": [{"text": "Served script.", "kind": "script"}]}
                    verdict = {"decision": "pass", "score": 0.97, "reasons": []}
                    answer = {"predictions": [verdict]}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )


def serve(server: FakeModelServer) -> Iterator[FakeModelServer]:
    server.thread.start()
    yield server
    server.release.set()
    server.httpd.shutdown()
    server.httpd.server_close()
    server.thread.join()


@pytest.fixture
def model_server() -> Iterator[FakeModelServer]:
    yield from serve(FakeModelServer())


@pytest.fixture
def hung_server() -> Iterator[FakeModelServer]:
    yield from serve(FakeModelServer(hung=True))


def test_default_chain_end_to_end_against_a_real_server(tmp_path: Path, model_server) -> None:
    settings = make_settings(tmp_path / "state", CONTENTML_SERVING_URL=model_server.url)

    with ContentStrategist.from_settings(settings, environ={}) as strategist:
        script = strategist.generate_script("volcanoes", "Upbeat science for teens.")

    assert model_server.paths == ["/openai/v1/chat/completions", "/v1/models/quality:predict"]
    assert (script.text, script.provider, script.cost_usd) == ("Served script.", "contentml", 0)
    assert (script.quality_decision, script.quality_score) == (Decision.PASS, 0.97)


# --- deadline --------------------------------------------------------------------------------


def hosted_at(server: FakeModelServer) -> dict[str, Any]:
    """The hosted provider on a real server, with a timeout far beyond the tests' deadlines."""
    return {**HOSTED_PROVIDER, "base_url": f"{server.url}/openai/v1", "timeout_seconds": 30}


def test_a_hung_provider_gives_way_to_the_next_within_the_deadline(
    build, hung_server, model_server
) -> None:
    ours = {**OUR_PROVIDER, "min_seconds": 1.5}
    strategist = build(
        [hosted_at(hung_server), ours], None, environ=WITH_KEY, serving_url=model_server.url
    )

    started = time.monotonic()
    script = strategist.generate_script("volcanoes", "Upbeat.", deadline=started + 3)
    seconds = time.monotonic() - started

    assert (script.text, script.provider) == ("Served script.", "contentml")
    # Asked once (the openai client does not retry), and given up after 3 - (1.5 + 0.25) s.
    assert hung_server.paths == ["/openai/v1/chat/completions"]
    assert model_server.paths == ["/openai/v1/chat/completions"]
    assert 1.2 < seconds < 3


def test_a_hung_last_provider_is_cut_to_the_deadline(build, hung_server) -> None:
    """Its own timeout is CONTENTML_SCRIPT_TIMEOUT_SECONDS + 5 s = 35 s."""
    strategist = build([OUR_PROVIDER], None, serving_url=hung_server.url)

    # 4 s, not less: under a loaded test run, the call can take a second to reach the
    # provider, and one left with under a second is skipped rather than called.
    started = time.monotonic()
    with pytest.raises(AllProvidersFailed, match=r"contentml: no answer within [1-4]\.\d\d s"):
        strategist.generate_script("volcanoes", "Upbeat.", deadline=started + 4.0)

    assert time.monotonic() - started < 4.5
    assert len(hung_server.paths) == 1


@pytest.mark.parametrize("deadline_in", [None, 10.0])
def test_each_provider_is_told_the_timeout_it_is_given(build, deadline_in: float | None) -> None:
    """`TIMEOUT_HEADER` is the timeout the client waits, so our server can end a generation in
    time to answer: the provider's own, or cut to the deadline (less 1.25 s kept for ours)."""
    hosted = {**HOSTED_PROVIDER, "timeout_seconds": 20}
    backend = Backend({HOSTED: [status(503)], OURS: [ok()]})
    strategist = build([hosted, OUR_PROVIDER], backend, environ=WITH_KEY)

    started = time.monotonic()
    deadline = None if deadline_in is None else started + deadline_in
    strategist.generate_script("volcanoes", "Upbeat.", deadline=deadline)

    sent = [(seen.host, float(seen.timeout_header or "nan")) for seen in backend.requests]
    assert [seconds for _, seconds in sent] == [seen.read_timeout for seen in backend.requests]
    if deadline_in is None:
        assert sent == [(HOSTED, 20), (OURS, 35)]
    else:
        (_, first), (_, second) = sent
        assert deadline_in - 1.25 - (time.monotonic() - started) < first <= deadline_in - 1.25
        assert deadline_in - (time.monotonic() - started) < second <= deadline_in


def test_a_client_that_retries_is_refused(build) -> None:
    strategist = build([OUR_PROVIDER], Backend({OURS: [ok()]}))
    (provider,) = strategist.providers
    retrying = replace(provider, clients=(provider.clients[0].with_options(max_retries=2),))

    with pytest.raises(ValueError, match=r"\['contentml'\] retry"):
        ContentStrategist(
            [retrying], FakeQuality(), monitor=strategist.monitor, default_max_tokens=64
        )


def test_a_provider_that_would_eat_the_next_ones_minimum_is_skipped(build) -> None:
    hosted = {**HOSTED_PROVIDER, "min_seconds": 2}
    ours = {**OUR_PROVIDER, "min_seconds": 1}
    backend = Backend({HOSTED: [ok()], OURS: [ok("Ours.")]})
    strategist = build([hosted, ours], backend, environ=WITH_KEY)

    # 2.5 s left, 1.25 s kept for ours: 1.25 s is under the hosted minimum.
    script = strategist.generate_script("volcanoes", "Upbeat.", deadline=time.monotonic() + 2.5)

    assert backend.hosts == [OURS]
    assert script.provider == "contentml"


def test_a_deadline_too_close_for_any_provider_names_the_time_left(build) -> None:
    hosted = {**HOSTED_PROVIDER, "min_seconds": 2}
    ours = {**OUR_PROVIDER, "min_seconds": 1}
    backend = Backend({HOSTED: [ok()], OURS: [ok()]})
    strategist = build([hosted, ours], backend, environ=WITH_KEY)

    with pytest.raises(AllProvidersFailed) as raised:
        strategist.generate_script("volcanoes", "Upbeat.", deadline=time.monotonic() + 0.5)

    assert backend.requests == []
    assert [type(error) for _, error in raised.value.failures] == [NoTimeLeft, NoTimeLeft]
    message = str(raised.value)
    assert re.search(
        r"hosted: skipped: 0\.\d\d s left of the deadline, 1.25 s of it kept for the providers "
        r"after it; it needs at least 2 s",
        message,
    ), message
    assert re.search(
        r"contentml: skipped: 0\.\d\d s left of the deadline; it needs at least 1 s", message
    ), message


def test_the_script_route_falls_back_within_its_sla(
    tmp_path: Path, monkeypatch, hung_server, model_server
) -> None:
    """The route's chain, from settings and the environment as the server builds it, with the
    SLA cut to 5 s: 4 s for the chain, 1.25 s of it kept for ours. The hosted provider needs
    2.25 s left when its turn comes; building the chain on first use takes up to 0.35 s on a
    busy machine, so a shorter SLA skips it there."""
    script_task = tasks.TASKS[tasks.Task.SCRIPT]
    monkeypatch.setitem(tasks.TASKS, tasks.Task.SCRIPT, replace(script_task, sla_seconds=5))
    monkeypatch.setenv("HOSTED_API_KEY", "sk-test")
    providers = [hosted_at(hung_server), {**OUR_PROVIDER, "min_seconds": 1}]
    settings = chain_settings(tmp_path, providers, model_server.url)
    ledger = CostLedger.from_settings(settings)
    answerer = tasks.TaskAnswerer(settings, [], ledger)
    app = FastAPI()
    app.include_router(tasks.tasks_router(answerer))

    try:
        started = time.monotonic()
        response = TestClient(app).post(
            script_task.route, json={"topic": "volcanoes", "persona": "Upbeat."}
        )
        seconds = time.monotonic() - started
    finally:
        answerer.close()
        ledger.close()

    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["script"], answer["provider"]) == ("Served script.", "contentml")
    assert (answer["quality_decision"], answer["quality_score"]) == ("pass", 0.97)
    assert len(hung_server.paths) == 1
    assert seconds < 5
