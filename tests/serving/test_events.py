"""The event bus and `GET /v1/events`: schemas per kind, filters, the token, delivery across
processes (the SQL store) and replicas (Redis), the publishers, and a real WebSocket client
seeing a batch job's progress and a promotion as they happen."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import jsonschema
import pytest
from fastapi import FastAPI
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from contentml import events
from contentml.events import (
    DATA_MODELS,
    EventFilter,
    EventHub,
    EventKind,
    make_event,
    message_schema,
)
from contentml.settings import Settings
from entrypoints.demo import free_port
from serving.admission import TOKEN_COOKIE, Admission, AdmissionMiddleware
from serving.backend.batch.queue import BatchQueue
from serving.backend.batch.routes import batch_router
from serving.backend.channels import channels_router
from serving.backend.costs import CostEntry, CostLedger
from serving.backend.event_stream import events_router
from tests.conftest import make_settings, requires_redis, wait_until
from tests.helpers.events import published
from tests.helpers.live import served
from tests.helpers.readme import README

SAMPLES = {
    EventKind.BATCH_PROGRESS: {
        "job_id": "j1", "task": "trend", "status": "running", "total": 3, "succeeded": 1,
        "failed": 0,
    },
    EventKind.ALIAS_CHANGED: {
        "model": "trend", "alias": "champion", "version": "2", "from_version": "1",
        "action": "promote", "reason": "better",
    },
    EventKind.ALERT_DRIFT: {
        "model": "quality", "drift_share": 0.6, "drifted_columns": ["length"],
        "threshold": 0.5, "run_id": "abc",
    },
    EventKind.ALERT_PERFORMANCE: {"model": "trend", "drop": 0.08, "threshold": 0.05},
    EventKind.ANOMALY: {
        "channel_id": "c", "metric": "views", "value": 9.0, "baseline": 2.0, "score": None,
        "event_timestamp": "2026-01-01T00:00:00",
    },
    EventKind.QUARANTINE: {"channel_id": "c", "quarantined": True, "reason": "strikes"},
    EventKind.WARNING_COST: {"streak": 10, "budget_usd": 1.0, "streak_length": 10},
    EventKind.WARNING_QUOTA: {
        "provider": "openai", "requests_today": 850, "daily_quota": 1000, "quota_used": 0.85,
        "threshold": 0.8,
    },
    EventKind.WARNING_PROVIDER: {
        "provider": "openai", "warning": "slow", "value": 2.5, "normal": 1.0, "threshold": 2.0,
    },
    EventKind.REVIEW_CREATED: {
        "item_id": "r1", "status": "pending", "source": "task", "video_id": "v1",
        "model_version": "3", "score": 0.62, "label": None,
    },
    EventKind.REVIEW_DECIDED: {
        "item_id": "r1", "status": "approved", "source": "task", "video_id": None,
        "model_version": "3", "score": 0.62, "label": "none",
    },
    EventKind.REVIEW_EXPIRED: {
        "item_id": "r1", "status": "expired", "source": "batch", "video_id": None,
        "model_version": None, "score": None, "label": None,
    },
    EventKind.CAPACITY_CHANGED: {
        "rate": 0.5, "reason": "contingency, openai: quota", "providers_skipped": ["openai"],
    },
}  # fmt: skip

TOKEN = "callers-token"
WAIT_SECONDS = 30.0


@pytest.fixture
def bus_settings(settings: Settings) -> Settings:
    """`settings`, whose bus this process publishes to."""
    events.configure(settings)
    return settings


@contextlib.contextmanager
def events_app(settings: Settings, token: str = "", *routers) -> Iterator[tuple[str, EventHub]]:
    """An app with `/v1/events` over a hub on the settings' bus (and `routers`), behind the
    admission middleware, served on a loopback port."""
    hub = EventHub(events.followed_buses(settings)).start()
    assert hub.wait_ready(10), "the hub did not start following the buses"
    app = FastAPI()
    app.add_middleware(AdmissionMiddleware, admission=Admission(8, token))
    app.include_router(events_router(hub))
    for router in routers:
        app.include_router(router)
    try:
        with served(app) as url:
            yield url, hub
    finally:
        hub.stop()


def ws_url(url: str, query: str = "") -> str:
    return url.replace("http://", "ws://") + "/v1/events" + (f"?{query}" if query else "")


def receive(client: ClientConnection, seconds: float = WAIT_SECONDS) -> dict:
    return json.loads(client.recv(timeout=seconds))


# --- schemas and filters -------------------------------------------------------------------


def test_every_kind_has_a_message_schema_its_events_fit():
    assert set(SAMPLES) == set(EventKind)
    for kind, data in SAMPLES.items():
        message = make_event(kind, data, channel="c").model_dump(mode="json")
        jsonschema.validate(message, message_schema(kind))
        wrong = {**message, "kind": next(k for k in EventKind if k != kind).value}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, message_schema(kind))


def test_the_readme_lists_each_kinds_data_fields_as_its_schema_has_them():
    rows = {
        match[1]: re.findall(r"`(\w+)`", match[2])
        for match in re.finditer(r"^\| `([a-z.]+)` \| (.*?) \|", README, flags=re.M)
        if match[1] in set(EventKind)
    }
    assert rows == {kind.value: list(DATA_MODELS[kind].model_fields) for kind in EventKind}


@pytest.mark.parametrize(
    ("kind", "data", "problem"),
    [
        ("alias.moved", {}, "unknown event kind 'alias.moved'"),
        ("batch.progress", {"job_id": "j"}, "batch.progress data does not fit its schema"),
        ("quarantine", {**SAMPLES[EventKind.QUARANTINE], "extra": 1}, "extra"),
    ],
)
def test_an_event_that_does_not_fit_is_refused_naming_why(kind, data, problem):
    with pytest.raises(ValueError, match=problem):
        make_event(kind, data)


def test_a_failed_publish_is_counted_and_logged_never_raised(bus_settings, caplog):
    before = events.FAILED.labels(kind="batch.progress")._value.get()
    events.publish("batch.progress", {"job_id": "j"})  # no exception reaches the caller
    assert events.FAILED.labels(kind="batch.progress")._value.get() == before + 1
    assert "event batch.progress not published" in caplog.text
    assert published(bus_settings) == []
    events.configure(make_settings(bus_settings.home, CONTENTML_EVENT_BUS="redis://127.0.0.1:1/0"))
    events.publish("quarantine", SAMPLES[EventKind.QUARANTINE])  # Redis unreachable: logged
    assert "event quarantine not published" in caplog.text


@pytest.mark.parametrize(
    ("kinds", "kind", "takes"),
    [
        ([], "anomaly", True),
        (["alert"], "alert.drift", True),
        (["alert."], "alert.performance", True),
        (["alert.drift"], "alert.performance", False),
        (["review,batch.progress"], "batch.progress", True),
        (["review"], "review.decided", True),
        (["warning.cost"], "warning.quota", False),
    ],
)
def test_kinds_filter_by_exact_value_or_prefix(kinds, kind, takes):
    event = make_event(kind, SAMPLES[EventKind(kind)])
    assert EventFilter.parse(kinds).takes(event) is takes


def test_a_kind_matching_nothing_is_refused_and_channels_filter():
    with pytest.raises(ValueError, match="kind 'al' matches no event kind"):
        EventFilter.parse(["al"])
    event = make_event(EventKind.ANOMALY, SAMPLES[EventKind.ANOMALY], channel="cooking")
    assert EventFilter.parse(channels=["gaming,cooking"]).takes(event)
    assert not EventFilter.parse(channels=["gaming"]).takes(event)


# --- the routes ----------------------------------------------------------------------------


def test_a_websocket_client_gets_events_another_process_publishes(settings):
    """Embedded mode: a child process (as a CLI command or a batch worker) publishes to the SQL
    store, the server's hub tails it, the client gets the message, filtered."""
    script = (
        "from contentml import events\n"
        f"events.publish('anomaly', {SAMPLES[EventKind.ANOMALY]!r}, channel='gaming')\n"
        f"events.publish('quarantine', {SAMPLES[EventKind.QUARANTINE]!r}, channel='cooking')\n"
    )
    with events_app(settings) as (url, hub), connect(ws_url(url, "channel=cooking")) as client:
        subprocess.run(
            [sys.executable, "-c", script], env={**os.environ, **settings.to_env()}, check=True
        )
        message = receive(client)
    assert message["kind"] == "quarantine" and message["channel"] == "cooking"
    assert message["data"] == SAMPLES[EventKind.QUARANTINE]
    jsonschema.validate(message, message_schema(EventKind.QUARANTINE))


def test_the_token_applies_to_the_websocket_and_the_event_stream(bus_settings):
    with events_app(bus_settings, TOKEN) as (url, hub):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(url)).close()
        assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            connect(ws_url(url, "token=wrong")).close()
        assert httpx.get(url + "/v1/events/schemas").status_code == 401
        with connect(ws_url(url, f"token={TOKEN}&kind=anomaly")) as by_query:
            events.publish("quarantine", SAMPLES[EventKind.QUARANTINE])
            events.publish("anomaly", SAMPLES[EventKind.ANOMALY], channel="c")
            assert receive(by_query)["kind"] == "anomaly"  # the quarantine was filtered out
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with connect(ws_url(url), additional_headers=headers) as by_header:
            events.publish("warning.cost", SAMPLES[EventKind.WARNING_COST])
            assert receive(by_header)["data"] == SAMPLES[EventKind.WARNING_COST]
        schemas = httpx.get(url + "/v1/events/schemas", headers=headers).json()
        assert set(schemas) == {k.value for k in EventKind}
        # Only the event routes take the token from the query: a URL lands in logs.
        assert httpx.get(url + f"/v1/events/schemas?token={TOKEN}").status_code == 401


def test_server_sent_events_are_the_fallback_with_a_cookie_token(bus_settings):
    with events_app(bus_settings, TOKEN) as (url, hub):
        bad = httpx.get(url + "/v1/events?kind=nothing", cookies={TOKEN_COOKIE: TOKEN})
        assert bad.status_code == 400 and "matches no event kind" in bad.json()["error"]
        assert httpx.get(url + "/v1/events", cookies={TOKEN_COOKIE: "wrong"}).status_code == 401
        with httpx.Client(cookies={TOKEN_COOKIE: TOKEN}, timeout=WAIT_SECONDS) as client:
            stream = client.stream(
                "GET", url + "/v1/events?kind=alias", headers={"Accept": "text/event-stream"}
            )
            with stream as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = filter(None, response.iter_lines())  # messages end with a blank line
                assert next(lines) == ": connected"
                events.publish("alias.changed", SAMPLES[EventKind.ALIAS_CHANGED])
                fields = [next(lines) for _ in range(3)]
    assert fields[1] == "event: alias.changed"
    message = json.loads(fields[2].removeprefix("data: "))
    assert fields[0] == f"id: {message['id']}" and message["data"]["version"] == "2"


@requires_redis
def test_with_redis_an_event_published_on_one_replica_reaches_a_client_on_another(tmp_path):
    """Two replicas (apps with their own hub, as two pods): a quarantine through replica A's
    route reaches a WebSocket client of replica B through Redis pub/sub (the two replicas have
    separate SQL stores here), and so does an event a process without Redis wrote to B's."""
    redis_bus = {"CONTENTML_EVENT_BUS": "redis://127.0.0.1:6379/0"}
    a = make_settings(tmp_path / "a", **redis_bus)
    b = make_settings(tmp_path / "b", **redis_bus)
    events.configure(a)
    channel = f"test-{uuid.uuid4().hex[:8]}"  # other test runs may share the Redis channel
    with (
        events_app(a, "", channels_router(a)) as (url_a, _),
        events_app(b) as (url_b, _),
        connect(ws_url(url_b, f"channel={channel}")) as client,
    ):
        answer = httpx.post(f"{url_a}/v1/channels/{channel}/quarantine", json={"reason": "spam"})
        assert answer.status_code == 200
        message = receive(client)
        assert published(a) == [] and published(b) == []  # through Redis, not a SQL store
        # A process without the Redis setting (a KFP task) publishes to the SQL store, which
        # the replicas follow too.
        data = {"channel_id": channel, "quarantined": False, "reason": None}
        script = (
            f"from contentml.events import publish\npublish('quarantine', {data!r}, {channel!r})"
        )
        sql_only = make_settings(tmp_path / "b")
        env = {**os.environ, **sql_only.to_env()}
        subprocess.run([sys.executable, "-c", script], env=env, check=True)
        released = receive(client)
    assert message["kind"] == "quarantine"
    assert message["data"] == {"channel_id": channel, "quarantined": True, "reason": "spam"}
    assert released["data"] == data and [e.data for e in published(b)] == [data]


# --- the publishers --------------------------------------------------------------------------


def test_quarantine_release_and_anomalies_are_published(bus_settings):
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.include_router(channels_router(bus_settings))
    client = TestClient(app)
    assert client.post("/v1/channels/c1/quarantine", json={"reason": "strikes"}).status_code == 200
    assert client.delete("/v1/channels/c1/quarantine").status_code == 200
    for hour in range(12):
        views = 10_000 if hour == 11 else 100 + hour
        point = {"event_timestamp": f"2026-01-01T{hour:02d}:00:00", "views": views}
        assert client.post("/v1/channels/c1/metrics", json=point).status_code == 200
    seen = [(e.kind.value, e.channel, e.data) for e in published(bus_settings)]
    assert seen[:2] == [
        ("quarantine", "c1", {"channel_id": "c1", "quarantined": True, "reason": "strikes"}),
        ("quarantine", "c1", {"channel_id": "c1", "quarantined": False, "reason": None}),
    ]
    anomalies = [data for kind, _, data in seen[2:] if kind == "anomaly"]
    assert [a["metric"] for a in anomalies] == ["views"] and anomalies[0]["channel_id"] == "c1"


def test_a_cost_streak_crossing_its_limit_publishes_one_warning(bus_settings):
    ledger = CostLedger(bus_settings.backend_store, streak_length=3)
    for video in range(5):
        ledger.record(CostEntry(channel="c", kind="script", usd=2.0, video_id=f"v{video}"))
    ledger.close()
    warnings = [e for e in published(bus_settings) if e.kind is EventKind.WARNING_COST]
    assert [w.data for w in warnings] == [{"streak": 3, "budget_usd": 1.0, "streak_length": 3}]


# --- as they happen, end to end ---------------------------------------------------------------


@pytest.mark.slow
def test_a_websocket_client_sees_a_batch_jobs_progress_and_a_promotion_as_they_happen(settings):
    """A real server route, a real `contentml batch worker` and a real `contentml registry
    promote`, each its own process: the client sees the job queued, then its chunks answered,
    then the promotion, each before the next step starts."""
    from tests.helpers.batch import trend_items, worker
    from tests.helpers.registry import register

    events.configure(settings)
    queue = BatchQueue(settings)
    with (
        events_app(settings, TOKEN, batch_router(queue)) as (url, hub),
        connect(ws_url(url, f"token={TOKEN}&kind=batch&kind=alias.changed")) as client,
    ):
        submitted = httpx.post(
            url + "/batch/trend",
            json={"items": trend_items(250), "channel": "cooking"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert submitted.status_code in (200, 202), submitted.text
        job_id = submitted.json()["job_id"]
        first = receive(client)
        assert (first["kind"], first["data"]["status"], first["data"]["succeeded"]) == (
            "batch.progress", "queued", 0,
        )  # fmt: skip
        progress = [first]
        with worker(settings):
            while progress[-1]["data"]["status"] != "done":
                progress.append(receive(client, 120))
        assert {m["data"]["job_id"] for m in progress} == {job_id}
        assert {m["channel"] for m in progress} == {"cooking"}
        # Each message is the job's counts when its chunk ended; two worker threads may
        # publish theirs in either order, so the counts rise but not always one by one.
        counts = [m["data"]["succeeded"] for m in progress]
        assert counts[-1] == 250 and len(set(counts)) >= 3 and max(counts) == 250
        version = register(settings, "events-toy")
        promoted = subprocess.run(
            [sys.executable, "-m", "entrypoints.cli", "promote", "events-toy",
             version, "--reason", "seen live"],
            env={**os.environ, **settings.to_env()}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert promoted.returncode == 0, promoted.stderr
        while (moved := receive(client))["kind"] == "batch.progress":
            assert moved["data"]["job_id"] == job_id  # a chunk's counts published late
    assert moved["kind"] == "alias.changed"
    assert moved["data"] == {
        "model": "events-toy", "alias": "champion", "version": version, "from_version": None,
        "action": "promote", "reason": "seen live",
    }  # fmt: skip
    for message in [*progress, moved]:
        jsonschema.validate(message, message_schema(EventKind(message["kind"])))
    queue.close()


def test_closing_the_streams_waits_for_their_clients_to_leave_then_gives_up():
    """A stopping server lets its streams say goodbye before uvicorn cuts them, but a client
    that never leaves holds it up only `timeout` seconds."""
    hub = EventHub([])

    async def scenario() -> tuple[list[str], float]:
        order: list[str] = []

        async def client(subscription: events.Subscription) -> None:
            async for _ in subscription:
                pass
            await asyncio.sleep(0.2)  # the close handshake
            order.append("client left")
            hub.unsubscribe(subscription)

        leaving = asyncio.create_task(client(hub.subscribe(EventFilter.parse((), ()))))
        await hub.close_streams(timeout=5)
        order.append("closed")
        await leaving
        hub.subscribe(EventFilter.parse((), ()))  # never iterated, never unsubscribed
        started = time.monotonic()
        await hub.close_streams(timeout=0.3)
        return order, time.monotonic() - started

    order, stuck = asyncio.run(scenario())
    assert order == ["client left", "closed"]
    assert 0.3 <= stuck < 2


@pytest.mark.slow
def test_on_sigterm_the_event_streams_end_after_the_drain_and_the_server_stops(settings):
    """Open streams would hold a stopping server up for its whole grace period (30 s): they
    end when the drain does (WebSocket close 1001), and the clients reconnect elsewhere."""
    stopping = make_settings(settings.home, CONTENTML_SHUTDOWN_DRAIN_SECONDS="0.5")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.cli", "serve", "--port", str(port), "--workers", "0"],
        env={**os.environ, **stopping.to_env()},
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _ready(url), 120, "the server is ready", every=0.5)
        with (
            connect(ws_url(url)) as socket,
            httpx.stream("GET", url + "/v1/events", timeout=WAIT_SECONDS) as stream,
        ):
            lines = stream.iter_lines()
            assert next(lines) == ": connected"
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosedOK) as closed:
                socket.recv(timeout=WAIT_SECONDS)
            assert closed.value.rcvd.code == 1001
            assert [line for line in lines if line] == []  # the stream ended, no error
            assert process.wait(timeout=WAIT_SECONDS) == 0
            assert time.monotonic() - started < 10  # not the 30 s grace
    finally:
        if process.poll() is None:
            process.kill()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/v2/health/ready", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False
