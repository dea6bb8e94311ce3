"""CrisisManager's API: anomalies flagged on the request that shows them, quarantine kept
durably and released, bad payloads answered with 400."""

from __future__ import annotations

import asyncio
import datetime
import math
import sqlite3
import time

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from monitoring.crisis import QuarantineStore, SqlMetricHistory, points
from serving.admission import Admission, AdmissionMiddleware
from serving.backend.channels import channels_router
from tests.conftest import make_settings, requires_postgres

START = datetime.datetime(2026, 11, 26, tzinfo=datetime.UTC)


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path / "state")


def channels_app(settings) -> FastAPI:
    """The routes behind the admission middleware, as `contentml serve` has them: it checks
    the channel ids in paths."""
    app = FastAPI()
    app.add_middleware(AdmissionMiddleware, admission=Admission(2))
    app.include_router(channels_router(settings))
    return app


@pytest.fixture
def client(settings):
    with TestClient(channels_app(settings)) as client:
        yield client


def point(hour: int, **metrics) -> dict:
    return {"event_timestamp": (START + datetime.timedelta(hours=hour)).isoformat(), **metrics}


def test_a_view_spike_is_flagged_then_the_channel_quarantined_and_released(client, settings):
    for hour, views in enumerate([1000, 1040, 980, 1010, 995, 1020, 1005, 990, 1015, 1000]):
        answer = client.post("/v1/channels/ch_a/metrics", json=point(hour, views=views)).json()
        assert answer["anomalies"] == [] and answer["quarantined"] is False
    spike = client.post("/v1/channels/ch_a/metrics", json=point(10, views=250_000)).json()
    (anomaly,) = spike["anomalies"]
    assert anomaly["metric"] == "views" and anomaly["score"] > 3.5

    held = client.post("/v1/channels/ch_a/quarantine", json={"reason": "view spike"})
    assert held.status_code == 200 and held.json()["quarantined"] is True
    # Durable: another store on the same database (a restart, a second replica) sees it.
    assert QuarantineStore(settings.backend_store).get("ch_a").reason == ("view spike")
    assert [q["channel_id"] for q in client.get("/v1/channels").json()["quarantined"]] == ["ch_a"]
    released = client.delete("/v1/channels/ch_a/quarantine")
    assert released.status_code == 200 and released.json()["quarantined"] is False
    assert client.delete("/v1/channels/ch_a/quarantine").status_code == 404


def test_a_new_strike_is_reported_with_a_null_score(client):
    client.post("/v1/channels/ch_b/metrics", json=point(0, strikes=0))
    (strike,) = client.post("/v1/channels/ch_b/metrics", json=point(1, strikes=1)).json()[
        "anomalies"
    ]
    assert strike["metric"] == "strikes" and strike["score"] is None


@pytest.mark.parametrize(
    ("path", "body", "problem"),
    [
        ("/v1/channels/ch_c/metrics", {"views": 10}, "event_timestamp: Field required"),
        ("/v1/channels/ch_c/metrics", point(0, views=-1), "views: Input should be greater"),
        ("/v1/channels/ch_c/metrics", point(0, follows=3), "follows: Extra inputs"),
        ("/v1/channels/ch_c/quarantine", {"reason": ""}, "reason: String should have at least"),
        ("/v1/channels/ch_c/quarantine", {}, "reason: Field required"),
    ],
)
def test_bad_payloads_get_400_naming_the_field(client, path, body, problem):
    response = client.post(path, json=body)
    assert response.status_code == 400 and problem in response.json()["error"]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('{"views": Infinity}', "views: Input should be a finite number"),
        ('{"likes": NaN}', "likes: Input should be a finite number"),
        ('{"views": 1e400}', "views: Input should be a finite number"),
        (
            '{"comment_rate": 1e300}',
            "comment_rate: Input should be less than or equal to 1000000000000000",
        ),
        ('{"strikes": 1' + "0" * 40 + "}", "strikes: Input should be less than or equal to 1000"),
    ],
)
def test_a_non_finite_or_huge_metric_gets_400_and_is_not_kept(client, value, problem):
    """Kept, it made every answer of the channel unserialisable: a 500 after the point was
    stored, so each retry stored it again."""
    for hour, views in enumerate(STEADY_VIEWS):
        client.post("/v1/channels/ch_f/metrics", json=point(hour, views=views))
    body = value.replace("{", '{"event_timestamp": "2026-11-26T10:00:00+00:00", ', 1)
    refused = client.post(
        "/v1/channels/ch_f/metrics", content=body, headers={"content-type": "application/json"}
    )
    assert refused.status_code == 400 and problem in refused.json()["error"], refused.text
    # The window still holds the steady hours only: a spike is scored against them.
    spike = client.post("/v1/channels/ch_f/metrics", json=point(11, views=250_000))
    (anomaly,) = spike.json()["anomalies"]
    assert anomaly["baseline"] == pytest.approx(math.log1p(1002.5))


@pytest.mark.parametrize(
    ("channel_id", "problem"),
    [
        # As sent in the path; the server decodes the escapes once.
        ("%2e%2e", "contains '..'"),
        ("ch..a", "contains '..'"),
        ("a%2Fb", "contains a '/'"),
        ("..%2F..%2Fetc", "contains '..'"),
        ("a%5Cb", "contains a backslash"),
        ("a%00b", "contains a NUL byte"),
        ("a%25", "contains a '%'"),  # the test client decodes twice: a '%' is all it can send
        ("ch%20a", "may only hold letters, digits"),
        ("c" * 65, "longer than 64 characters"),
    ],
)
@pytest.mark.parametrize(
    "route", ["GET {}", "POST {}/metrics", "POST {}/quarantine", "DELETE {}/quarantine"]
)
def test_a_hostile_channel_id_gets_400_and_touches_nothing(
    client, settings, route, channel_id, problem
):
    method, path = route.split()
    body = point(0, views=10) if path.endswith("metrics") else {"reason": "spam"}
    answer = client.request(
        method, f"/v1/channels/{path.format(channel_id)}", json=body if method == "POST" else None
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error.startswith("channel id ") and problem in error, error
    assert QuarantineStore(settings.backend_store).all() == []


STEADY_VIEWS = [1000, 1040, 980, 1010, 995, 1020, 1005, 990, 1015, 1000]
"""Ten hours of a calm channel: a full window, against which 250,000 views is a spike."""


def test_replicas_share_each_channels_history_and_a_restart_keeps_it(settings):
    """Two servers' routes on one store: the window one replica filled scores the other's
    point, and a server started afresh still has it."""
    with TestClient(channels_app(settings)) as first, TestClient(channels_app(settings)) as second:
        for hour, views in enumerate(STEADY_VIEWS):
            (first if hour % 2 else second).post(
                "/v1/channels/ch_a/metrics", json=point(hour, views=views)
            )
        assert first.post("/v1/channels/ch_a/quarantine", json={"reason": "r"}).status_code == 200
        assert second.get("/v1/channels/ch_a").json()["quarantined"] is True
    with TestClient(channels_app(settings)) as restarted:
        spike = restarted.post("/v1/channels/ch_a/metrics", json=point(10, views=250_000)).json()
    assert [a["metric"] for a in spike["anomalies"]] == ["views"]
    assert spike["quarantined"] is True and spike["reason"] == "r"


def test_the_stored_history_keeps_one_window_per_channel_and_metric(settings):
    store = QuarantineStore(settings.backend_store)
    history = SqlMetricHistory(store.engine)
    for value in range(30):
        history.append("ch_a", "views", float(value), keep=24)
    history.append("ch_b", "views", 7.0, keep=24)
    assert history.recent("ch_a", "views", 24) == [float(v) for v in range(6, 30)]
    assert history.recent("ch_a", "views", 3) == [27.0, 28.0, 29.0]
    assert history.recent("ch_b", "views", 24) == [7.0] and history.recent("ch_c", "likes", 5) == []
    with store.engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(points)) == 25
    store.close()


@requires_postgres
def test_two_replicas_on_postgresql_agree_on_quarantine(postgres_url):
    """The cluster's replicas each open the shared store: what one decides, the other answers."""
    first, second = QuarantineStore(postgres_url), QuarantineStore(postgres_url)
    try:
        held = first.quarantine("ch_p", "view spike")
        assert second.get("ch_p") == held
        # Quarantining again, on either replica, keeps the first start and reason.
        assert second.quarantine("ch_p", "another reason") == held
        assert [q.channel_id for q in first.all()] == ["ch_p"]
        assert second.release("ch_p") and first.get("ch_p") is None
        assert not first.release("ch_p")
    finally:
        first.close()
        second.close()


def test_the_routes_keep_quarantine_in_the_backend_store_not_under_home(settings):
    other = make_settings(
        settings.home.parent / "replica-b", CONTENTML_BACKEND_STORE=settings.backend_store
    )
    with TestClient(channels_app(settings)) as one, TestClient(channels_app(other)) as two:
        assert one.post("/v1/channels/ch_r/quarantine", json={"reason": "r"}).status_code == 200
        assert two.get("/v1/channels/ch_r").json()["quarantined"] is True
    assert not list(settings.home.rglob("quarantine.db"))


def test_a_write_waiting_on_a_locked_store_leaves_the_event_loop_free(settings):
    """SQLite waits up to its busy timeout for another process's writer: the route waits in a
    thread while the server goes on answering other requests."""
    app = channels_app(settings)

    async def live() -> dict:
        return {"live": True}

    app.add_api_route("/live", live)
    writer = sqlite3.connect(settings.backend_store.removeprefix("sqlite:///"))
    writer.execute("BEGIN EXCLUSIVE")

    async def scenario() -> tuple[float, int]:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            waiting = asyncio.create_task(
                client.post("/v1/channels/ch_a/quarantine", json={"reason": "r"})
            )
            await asyncio.sleep(0.3)
            started = time.perf_counter()
            assert (await client.get("/live")).status_code == 200
            elapsed = time.perf_counter() - started
            writer.rollback()
            return elapsed, (await waiting).status_code

    try:
        elapsed, status = asyncio.run(scenario())
    finally:
        writer.close()
    assert elapsed < 0.2 and status == 200
