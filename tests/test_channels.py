"""CrisisManager's API: anomalies flagged on the request that shows them, quarantine kept
durably and released, bad payloads answered with 400."""

from __future__ import annotations

import datetime

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from monitoring.crisis import QuarantineStore
from serving.channels import channels_router
from tests.conftest import make_settings

START = datetime.datetime(2026, 11, 26, tzinfo=datetime.UTC)


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path / "state")


@pytest.fixture
def client(settings):
    app = FastAPI()
    app.include_router(channels_router(settings))
    with TestClient(app) as client:
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
    # Durable: another store on the same file (a restart, a second replica) sees it.
    assert QuarantineStore(settings.home / "crisis" / "quarantine.db").get("ch_a").reason == (
        "view spike"
    )
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
