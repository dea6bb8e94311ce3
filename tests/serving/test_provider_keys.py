"""Provider operations: many API keys per provider, 429s and their `Retry-After`, daily
quotas, the failure threshold, the recommended generation rate, the early warnings on the
event stream, `contentml providers status` and the providers' `/metrics` gauges. The
providers are a real local HTTP server speaking OpenAI's chat completions; the usage store is
SQLite and PostgreSQL (skipped when it is not running)."""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from contentml import events
from contentml.settings import Settings
from serving.admission import Admission, AdmissionMiddleware
from serving.backend.capacity import CAPACITY_ROUTE, capacity_router
from serving.caller import provider_usage
from serving.caller.provider_keys import parse_keys
from serving.caller.provider_monitor import ProviderMonitor, register_provider_metrics
from serving.caller.providers_config import ProviderConfig, ProviderConfigError
from serving.caller.strategist import ContentStrategist, retry_after
from tests.conftest import make_settings
from tests.helpers.registry import cli

# 2026-03-02 10:00 UTC: before the quota warning's 18:00.
MORNING = datetime.datetime(2026, 3, 2, 10, tzinfo=datetime.UTC).timestamp()


class WallClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "any",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50},
    }


class FakeProvider:
    """An OpenAI-compatible provider on a free port: `/v1/chat/completions` (hosted, keyed)
    and `/openai/v1/chat/completions` (our endpoint). A key in `limited` answers 429 with
    `Retry-After` and, as OpenAI's errors do, a message quoting the key; every hosted request
    answers `status` otherwise. It counts requests per key and answer."""

    def __init__(self) -> None:
        self.limited: set[str] = set()
        self.retry_after = "120"
        self.status = 200
        self.seen: Counter[tuple[str, int]] = Counter()
        """(key or `ours`, status) -> requests."""
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers["Content-Length"]))
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if self.path == "/openai/v1/chat/completions":
                    key, status, body = "ours", 200, completion("Our script.")
                elif key in fake.limited:
                    status = 429
                    message = f"Rate limit reached for key {key}; try again later"
                    body = {"error": {"message": message, "type": "requests"}}
                elif fake.status != 200:
                    status = fake.status
                    body = {"error": {"message": f"overloaded (key {key})", "type": "server"}}
                else:
                    status, body = 200, completion("Hosted script.")
                with fake.lock:
                    fake.seen[key, status] += 1
                data = json.dumps(body).encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", fake.retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answered(self, key: str) -> int:
        return self.seen[key, 200]


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider()
    thread = threading.Thread(
        target=fake.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()
    thread.join()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path) -> str:
    """The shared usage store's URL, empty."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'backend.db'}"
    url = request.getfixturevalue("postgres_url")
    engine = provider_usage.ProviderUsage(url).engine
    provider_usage.metadata.drop_all(engine)  # the database lives for the module
    engine.dispose()
    return url


def new_keys(count: int) -> list[str]:
    return [f"sk-live-{secrets.token_hex(12)}" for _ in range(count)]


def chain(
    folder: Path, provider: FakeProvider, store: str, keys: list[str], **hosted: Any
) -> Settings:
    """Settings whose chain is the fake's hosted API (keys from a Secret-like file) then our
    endpoint on the same fake, sharing `store`."""
    keys_file = folder / "hosted-keys.yaml"
    keys_file.write_text(yaml.safe_dump(keys))
    providers = [
        {
            "name": "hosted",
            "model": "gpt-4o",
            "base_url": provider.url + "/v1",
            "api_keys_file": str(keys_file),
            "input_usd_per_million_tokens": 2.5,
            "output_usd_per_million_tokens": 10.0,
            **hosted,
        },
        {"name": "contentml", "model": "script"},
    ]
    path = folder / "providers.yaml"
    path.write_text(yaml.safe_dump({"providers": providers, "cache_ttl_seconds": 0}))
    return make_settings(
        folder / "state",
        CONTENTML_SCRIPT_PROVIDERS=str(path),
        CONTENTML_SERVING_URL=provider.url,
        CONTENTML_BACKEND_STORE=store,
    )


def scorer(score: float = 0.9) -> Callable[[str], dict]:
    return lambda text: {"decision": "pass", "score": score, "reasons": []}


@pytest.fixture
def build() -> Iterator[Callable[..., ContentStrategist]]:
    made: list[ContentStrategist] = []

    def build(settings: Settings, wall: WallClock | None = None, score: float = 0.9):
        strategist = ContentStrategist.from_settings(
            settings, environ={}, quality=scorer(score), **({"wall_clock": wall} if wall else {})
        )
        made.append(strategist)
        return strategist

    yield build
    for strategist in made:
        strategist.close()


def published(settings: Settings) -> list[events.Event]:
    bus = events.SqlBus(settings.backend_store)
    try:
        return [event for _, event in bus.after(0)]
    finally:
        bus.close()


# --- the check -------------------------------------------------------------------------


def test_many_keys_some_answering_429_keep_answering_with_the_right_counts(
    tmp_path: Path, provider: FakeProvider, store: str, build, caplog, capsys, monkeypatch
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = new_keys(12)
    provider.limited = {keys[2], keys[5], keys[7]}
    settings = chain(tmp_path, provider, store, keys, daily_quota_per_key=1000)
    strategist = build(settings)

    scripts = [strategist.generate_script(f"topic {i}", "Upbeat.") for i in range(30)]

    # Every call answered by the hosted provider, none by the fallback.
    assert {s.provider for s in scripts} == {"hosted"}
    assert provider.seen["ours", 200] == 0
    # Each 429 key was asked once, then skipped for its Retry-After; the 30 answers spread
    # evenly over the 9 others.
    assert [provider.seen[k, 429] for k in sorted(provider.limited)] == [1, 1, 1]
    answered = [provider.answered(k) for k in keys if k not in provider.limited]
    assert sum(answered) == 30 and max(answered) - min(answered) <= 1

    status = ProviderMonitor.from_settings(settings, environ={}).status()
    hosted = status["providers"][0]
    assert hosted["name"] == "hosted"
    assert (hosted["requests_today"], hosted["daily_quota"]) == (30, 12_000)
    assert hosted["quota_used"] == pytest.approx(30 / 12_000)
    assert hosted["keys"] == 12
    assert hosted["keys_limited"] == [2, 5, 7]
    assert hosted["keys_available"] == [i for i in range(12) if i not in (2, 5, 7)]
    assert hosted["rate_limit_errors_last_hour"] == 3
    assert hosted["failures_last_hour"] == 0
    assert [k["requests_today"] for k in hosted["key_states"]] == [
        provider.answered(k) for k in keys
    ]
    assert hosted["p50_seconds"] > 0 and hosted["normal_p50_seconds"] is None
    assert status["capacity"]["rate"] == 1.0

    # The CLI says the same, from the same store, reading the keys file itself.
    exit_code, printed, _ = cli(settings, monkeypatch, capsys, "providers", "status", "--json")
    assert exit_code == 0
    assert json.loads(printed)["providers"][0]["keys_limited"] == [2, 5, 7]
    exit_code, table, _ = cli(settings, monkeypatch, capsys, "providers", "status")
    assert exit_code == 0
    printed += table

    registry = CollectorRegistry()
    register_provider_metrics(ProviderMonitor.from_settings(settings, environ={}), registry)
    scraped = generate_latest(registry).decode()
    assert 'contentml_provider_rate_limit_errors_last_hour{provider="hosted"} 3.0' in scraped
    assert 'contentml_provider_keys{provider="hosted",state="limited"} 3.0' in scraped
    assert 'contentml_provider_requests_today{provider="hosted"} 30.0' in scraped

    # No key's text anywhere: logs, CLI output, metrics, scripts, events.
    outputs = [caplog.text, printed, scraped, json.dumps(status), repr(scripts)]
    outputs += [e.model_dump_json() for e in published(settings)]
    assert "key[2]" in caplog.text  # the 429 message quoted the key: redacted, by index
    for key in keys:
        assert all(key not in text for text in outputs)


def test_a_key_comes_back_after_its_retry_after(
    tmp_path: Path, provider: FakeProvider, build
) -> None:
    keys = new_keys(2)
    provider.limited = {keys[0]}
    provider.retry_after = "30"
    wall = WallClock(MORNING)
    strategist = build(chain(tmp_path, provider, f"sqlite:///{tmp_path / 'b.db'}", keys), wall)

    strategist.generate_script("a", "Calm.")  # key 0: 429, then key 1 answers
    strategist.generate_script("b", "Calm.")  # key 0 skipped unasked
    assert (provider.seen[keys[0], 429], provider.answered(keys[1])) == (1, 2)

    provider.limited = set()
    wall.now += 31
    strategist.generate_script("c", "Calm.")  # the least used key again
    assert provider.answered(keys[0]) == 1


def test_replicas_share_the_keys_limits_and_counts(
    tmp_path: Path, provider: FakeProvider, store: str, build
) -> None:
    keys = new_keys(3)
    provider.limited = {keys[0]}
    settings = chain(tmp_path, provider, store, keys)
    first, second = build(settings), build(settings)

    first.generate_script("a", "Calm.")  # key 0 answers 429, key 1 writes
    second.generate_script("b", "Calm.")  # skips key 0 unasked; key 2 is the least used
    second.generate_script("c", "Calm.")
    first.generate_script("d", "Calm.")

    assert provider.seen[keys[0], 429] == 1
    assert (provider.answered(keys[1]), provider.answered(keys[2])) == (2, 2)


# --- contingency -------------------------------------------------------------------------------


def test_past_95_percent_of_the_quota_the_chain_falls_back_at_half_rate(
    tmp_path: Path, provider: FakeProvider, build
) -> None:
    keys = new_keys(3)
    wall = WallClock(MORNING)
    settings = chain(
        tmp_path, provider, f"sqlite:///{tmp_path / 'b.db'}", keys, daily_quota_per_key=2
    )
    events.configure(settings)
    strategist = build(settings, wall)
    monitor = strategist.monitor  # the API's own monitor, on the test's clock
    api = FastAPI()
    api.include_router(capacity_router(monitor))
    client = TestClient(api)

    written = [strategist.generate_script(f"t{i}", "Calm.").provider for i in range(8)]

    # 6 requests fill the 3 keys' quota of 2: then our self-hosted model writes.
    assert written == ["hosted"] * 6 + ["contentml"] * 2
    assert [provider.answered(k) for k in keys] == [2, 2, 2]
    answer = client.get(CAPACITY_ROUTE).json()
    assert answer["rate"] == 0.5 and answer["providers_skipped"] == ["hosted"]
    assert "hosted: 6 of today's 6 requests used" in answer["reason"]
    assert "scripts come from contentml" in answer["reason"]
    assert monitor.state("hosted").skipped_until == MORNING + 14 * 3600  # next UTC midnight
    kinds = [(e.kind.value, e.data.get("rate")) for e in published(settings)]
    # Warned once past 80 % (5 of 6, before 18:00), contingency announced once.
    assert kinds.count(("warning.quota", None)) == 1
    assert kinds.count(("capacity.changed", 0.5)) == 1

    wall.now += 24 * 3600  # the next UTC day: a fresh quota
    assert strategist.generate_script("next day", "Calm.").provider == "hosted"
    assert client.get(CAPACITY_ROUTE).json()["rate"] == 1.0
    assert ("capacity.changed", 1.0) in [
        (e.kind.value, e.data.get("rate")) for e in published(settings)
    ]


def test_past_its_failure_threshold_a_provider_cools_down(
    tmp_path: Path, provider: FakeProvider, build
) -> None:
    keys = new_keys(2)
    provider.status = 503
    wall = WallClock(MORNING)
    settings = chain(
        tmp_path,
        provider,
        f"sqlite:///{tmp_path / 'b.db'}",
        keys,
        max_failures_per_hour=2,
        cooldown_seconds=60,
    )
    events.configure(settings)
    strategist = build(settings, wall)

    for i in range(4):
        assert strategist.generate_script(f"t{i}", "Calm.").provider == "contentml"
    # Three failures (over the threshold of 2), then the fourth call skipped it unasked.
    assert sum(provider.seen[k, 503] for k in keys) == 3

    wall.now += 61
    strategist.generate_script("after the cool-down", "Calm.")
    assert sum(provider.seen[k, 503] for k in keys) == 4
    state = strategist.monitor.state("hosted")
    assert state.skipped_until == pytest.approx(wall.now + 60, abs=1)
    assert "4 failures in the last hour (threshold 2)" in state.skip_reason
    # The skipped provider's contingency reaches the event stream, though another answered.
    (changed,) = [e.data for e in published(settings) if e.kind.value == "capacity.changed"]
    assert (changed["rate"], changed["providers_skipped"]) == (0.5, ["hosted"])
    assert "3 failures in the last hour (threshold 2)" in changed["reason"]


def test_rate_limit_slow_and_low_quality_warnings_reach_the_event_stream(
    tmp_path: Path, provider: FakeProvider, build
) -> None:
    keys = new_keys(8)
    provider.limited = set(keys[:6])
    wall = WallClock(MORNING)
    # A normal of a microsecond: any real answer is more than twice as slow.
    settings = chain(
        tmp_path,
        provider,
        f"sqlite:///{tmp_path / 'b.db'}",
        keys,
        normal_latency_seconds=1e-6,
    )
    events.configure(settings)
    strategist = build(settings, wall, score=0.5)

    for i in range(3):
        strategist.generate_script(f"t{i}", "Calm.")

    warnings = [e.data for e in published(settings) if e.kind.value == "warning.provider"]
    by_kind = Counter(w["warning"] for w in warnings)
    # Six 429s (> 5 an hour), slow, every script below 0.7: each sent once this hour.
    assert by_kind == {"rate_limit_errors": 1, "slow": 1, "low_quality": 1}
    assert {w["provider"] for w in warnings} == {"hosted"}


# --- keys and the route ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "sk-a\nsk-b\n\n# a comment\nsk-c\n",
        '["sk-a", "sk-b", "sk-c"]',
        "- sk-a\n- sk-b\n- sk-c\n",
    ],
)
def test_keys_one_per_line_or_a_list(text: str) -> None:
    assert parse_keys(text, "SECRET") == ("sk-a", "sk-b", "sk-c")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sk-secret-1\nsk-secret-1\n", r"SECRET: keys \[1\] repeat earlier keys"),
        ('["sk-secret-1", 7]', "SECRET: key 1 must be printable ASCII"),
        ("- sk-secret-1\n- [", "SECRET: not a readable key list"),
        ("{sk-secret-1: x}", "SECRET: key 0 must be printable ASCII"),
    ],
)
def test_bad_keys_are_named_by_index_never_quoted(text: str, message: str) -> None:
    with pytest.raises(ProviderConfigError, match=message) as raised:
        parse_keys(text, "SECRET")
    assert "sk-secret" not in str(raised.value)
    assert raised.value.__cause__ is None


def test_api_key_env_takes_several_keys(tmp_path: Path, provider: FakeProvider, build) -> None:
    keys = new_keys(2)
    settings = chain(tmp_path, provider, f"sqlite:///{tmp_path / 'b.db'}", keys)
    path = settings.script_providers
    config = yaml.safe_load(path.read_text())
    del config["providers"][0]["api_keys_file"]
    config["providers"][0]["api_key_env"] = "HOSTED_KEYS"
    path.write_text(yaml.safe_dump(config))

    strategist = ContentStrategist.from_settings(
        settings, environ={"HOSTED_KEYS": "\n".join(keys)}, quality=scorer()
    )
    with strategist:
        for i in range(4):
            strategist.generate_script(f"t{i}", "Calm.")
    assert [provider.answered(k) for k in keys] == [2, 2]


def test_capacity_route_takes_the_token(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "state")
    monitor = ProviderMonitor.from_settings(settings, environ={})
    api = FastAPI()
    api.add_middleware(AdmissionMiddleware, admission=Admission(4, token="callers"))
    api.include_router(capacity_router(monitor))
    client = TestClient(api)

    assert client.get(CAPACITY_ROUTE).status_code == 401
    answer = client.get(CAPACITY_ROUTE, headers={"Authorization": "Bearer callers"})
    assert answer.status_code == 200
    assert answer.json() == {
        "rate": 1.0,
        "reason": "every provider is within its quota and error threshold",
        "providers_skipped": [],
    }
    monitor.close()


def test_old_events_and_warning_claims_are_pruned(tmp_path: Path) -> None:
    wall = WallClock(MORNING)
    usage = provider_usage.ProviderUsage(f"sqlite:///{tmp_path / 'b.db'}", now=wall)
    usage.record_failure("hosted")
    assert usage.claim("warning.quota:hosted:day-1") and not usage.claim(
        "warning.quota:hosted:day-1"
    )
    wall.now += provider_usage.RETENTION_SECONDS + 1
    assert usage.claim("warning.quota:hosted:day-9")
    usage.record_call(
        "hosted", 0, prompt_tokens=1, completion_tokens=1, latency_s=0.1, quality_score=None
    )
    with usage.engine.connect() as connection:
        kinds = connection.execute(sa.select(provider_usage.events.c.kind)).scalars().all()
        claims = connection.execute(sa.select(provider_usage.warning_claims.c.name)).scalars()
        assert kinds == ["call"]
        assert claims.all() == ["warning.quota:hosted:day-9"]
    usage.close()


def test_claims_an_older_version_kept_in_notices_are_moved_and_kept(store: str) -> None:
    """Before `provider_warning_claims`, claims were `provider_notices` rows holding `sent`:
    opening the store moves them, so a warning sent before the upgrade is not sent again in
    its period, the rows are pruned like new claims, and the capacity notice stays."""
    engine = sa.create_engine(store.replace("postgresql://", "postgresql+psycopg://"))
    provider_usage.notices.create(engine)
    with engine.begin() as connection:
        connection.execute(
            provider_usage.notices.insert(),
            [
                {"name": "warning.quota:hosted:2026-03-02", "value": "sent"},
                {"name": "warning.provider:slow:hosted:493234", "value": "sent"},
                {"name": "capacity.rate", "value": "0.5"},
            ],
        )
    engine.dispose()
    wall = WallClock(MORNING)

    usage = provider_usage.ProviderUsage(store, now=wall)
    provider_usage.ProviderUsage(store, now=wall).close()  # a second replica: moves nothing

    assert not usage.claim("warning.quota:hosted:2026-03-02")
    assert not usage.claim("warning.provider:slow:hosted:493234")
    assert not usage.swap("capacity.rate", "0.5", default="1.0")
    with usage.engine.connect() as connection:
        notices = connection.execute(sa.select(provider_usage.notices.c.name)).scalars().all()
        claims = connection.execute(sa.select(provider_usage.warning_claims.c.at)).scalars()
        assert notices == ["capacity.rate"]
        assert claims.all() == [MORNING, MORNING]
    wall.now += provider_usage.RETENTION_SECONDS + 1
    usage.record_call(
        "hosted", 0, prompt_tokens=1, completion_tokens=1, latency_s=0.1, quality_score=None
    )
    with usage.engine.connect() as connection:
        assert connection.execute(sa.select(provider_usage.warning_claims)).all() == []
    usage.close()


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "17"}, 17.0),
        ({"retry-after-ms": "2500", "retry-after": "9"}, 2.5),
        ({"retry-after": "0"}, 1.0),  # at least a second: a key is never retried at once
        ({"retry-after": "999999"}, 86400.0),  # at most a day
        ({"retry-after": "soon"}, 60.0),
        ({"retry-after": "nan"}, 60.0),
        ({}, 60.0),
    ],
)
def test_retry_after_is_read_and_bounded(headers: dict[str, str], seconds: float) -> None:
    assert retry_after(headers, 60.0) == seconds


def test_retry_after_as_an_http_date() -> None:
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=120)
    header = later.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 110 < retry_after({"retry-after": header}, 60.0) <= 120


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"api_key_env": "A", "api_keys_file": "/k"}, "set api_key_env or api_keys_file, not both"),
        ({"daily_quota_per_key": 0}, "daily_quota_per_key must be at least 1"),
        ({"max_failures_per_hour": 0}, "max_failures_per_hour must be at least 1"),
        ({"cooldown_seconds": 0}, "cooldown_seconds must be positive"),
        ({"key_cooldown_seconds": -1}, "key_cooldown_seconds must be positive"),
        ({"normal_latency_seconds": float("inf")}, "normal_latency_seconds must be positive"),
        ({"name": "h" * 101}, "name must be printable and at most 100 characters"),
        ({"name": "h\nforged log line"}, "name must be printable"),
    ],
)
def test_bad_provider_operations_fields_are_named(fields: dict, message: str) -> None:
    with pytest.raises(ProviderConfigError, match=message):
        ProviderConfig(
            **{"name": "hosted", "model": "m", "base_url": "https://api.test/v1", **fields}
        )


def test_status_with_an_unreadable_keys_file_exits_2(
    tmp_path: Path, provider: FakeProvider, monkeypatch, capsys
) -> None:
    settings = chain(tmp_path, provider, f"sqlite:///{tmp_path / 'b.db'}", new_keys(1))
    keys_file = tmp_path / "hosted-keys.yaml"
    keys_file.write_text("- [not, a, key]\n")
    status, _, err = cli(settings, monkeypatch, capsys, "providers", "status", "--json")
    assert status == 2
    assert "hosted-keys.yaml: key 0 must be printable ASCII" in err


def test_concurrent_calls_spread_over_the_keys(tmp_path: Path, provider: FakeProvider, build):
    keys = new_keys(4)
    strategist = build(chain(tmp_path, provider, f"sqlite:///{tmp_path / 'b.db'}", keys))
    threads = [
        threading.Thread(target=strategist.generate_script, args=(f"t{i}", "Calm."))
        for i in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    answered = [provider.answered(k) for k in keys]
    assert sum(answered) == 16 and max(answered) - min(answered) <= 2, answered
