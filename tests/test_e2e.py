"""The platform loop end to end, as a user runs it: `contentml demo` twice, the registry
commands, and `contentml serve` answering real HTTP on a free port."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contentml.demo import free_port, model_server
from serving.client import ClientError, ContentMLClient
from tests.conftest import make_settings, run_cli

pytestmark = pytest.mark.slow

MAX_SERIES = "2"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e") / "state"


@pytest.fixture(scope="module")
def first_demo(home: Path) -> dict:
    result = run_cli(home, "demo", "--max-series", MAX_SERIES)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_demo_ends_with_the_summary_line(first_demo: dict):
    assert first_demo["pipeline"] == "training"
    assert first_demo["trend_forecast_points"] == 48
    assert first_demo["models"]["trend"]["aliases"] == {"challenger": "1", "champion": "1"}
    assert first_demo["endpoint"].endswith("/v1/models/trend:predict")
    assert first_demo["seconds"] > 0


def test_second_demo_registers_a_new_version(first_demo: dict, home: Path):
    result = run_cli(home, "demo", "--max-series", MAX_SERIES)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    trend = summary["models"]["trend"]
    assert trend["versions"] == ["1", "2"]
    assert trend["aliases"]["challenger"] == "2"
    assert trend["aliases"]["champion"] in {"1", "2"}

    listed = json.loads(run_cli(home, "models", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["trend"]
    assert listed[0]["aliases"] == trend["aliases"]


@pytest.fixture(scope="module")
def server(first_demo: dict, home: Path) -> Iterator[str]:
    with model_server(make_settings(home), free_port()) as url:
        yield url


def test_health_and_metrics(server: str):
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    assert httpx.get(f"{server}/v2/health/live").status_code == 200
    assert httpx.get(f"{server}/v1/models/trend").json() == {"name": "trend", "ready": True}
    metrics = httpx.get(f"{server}/metrics").text
    assert "request_predict_seconds" in metrics


def test_v1_forecast_for_a_known_series_and_a_history(server: str):
    with ContentMLClient(server) as client:
        known = client.predict_trend(series_id="H1", horizon=48)
        fitted = client.predict_trend(history=known["forecast"] * 2, horizon=12)
    assert len(known["forecast"]) == 48 and known["source"] == "cache"
    assert all(
        lo <= f <= hi
        for lo, f, hi in zip(known["lower"], known["forecast"], known["upper"], strict=True)
    )
    assert known["direction"] in {"up", "down"}
    assert known["model_version"]
    assert len(fitted["forecast"]) == 12 and fitted["source"] == "fitted"


def test_v2_infer(server: str):
    body = {
        "inputs": [
            {"name": "series_id", "datatype": "BYTES", "shape": [2], "data": ["H1", "H2"]},
            {"name": "horizon", "datatype": "INT32", "shape": [1], "data": [48]},
        ]
    }
    response = httpx.post(f"{server}/v2/models/trend/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["forecast"]["shape"] == [2, 48]
    assert outputs["direction"]["shape"] == [2]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{not json", "Unrecognized request format"),
        (b'{"instances": "H1"}', "instances"),
        (b'{"rows": []}', "instances"),
        (b'{"instances": []}', "at least one instance"),
        (b'{"instances": [{"series_id": 7}]}', "series_id"),
        (b'{"instances": [{"series_id": "H1", "horizon": "soon"}]}', "horizon"),
        (b'{"instances": [{"history": [1, 2, "x"]}]}', "history"),
        (b'{"instances": [{"history": [1.0, 2.0]}]}', "history must hold"),
        (b'{"instances": [{"series_id": "H999"}]}', "no forecast for series 'H999'"),
    ],
)
def test_bad_v1_payloads_get_400_with_a_message(server: str, body: bytes, problem: str):
    response = httpx.post(
        f"{server}/v1/models/trend:predict",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert problem in response.json()["error"]


def test_bad_payload_with_another_content_type_is_400(server: str):
    response = httpx.post(
        f"{server}/v1/models/trend:predict",
        content=b"{not json",
        headers={"content-type": "text/plain"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


def test_client_raises_client_error_without_retrying(server: str):
    with ContentMLClient(server) as client, pytest.raises(ClientError, match="H999"):
        client.predict_trend(series_id="H999")


def test_promote_rollback_history(first_demo: dict, home: Path, server: str):
    # Runs after the second demo (test order): versions 1 and 2 exist.
    promoted = run_cli(home, "promote", "trend", "2", "--reason", "e2e")
    assert promoted.returncode == 0, promoted.stderr
    rolled = run_cli(home, "rollback", "trend")
    assert rolled.returncode == 0, rolled.stderr
    rolled_event = json.loads(rolled.stdout)
    assert rolled_event["from_version"] == "2"
    history = json.loads(run_cli(home, "history", "trend", "--json").stdout)
    assert [e["action"] for e in history][-2:] == ["promote", "rollback"]
    assert history[-1]["to_version"] == rolled_event["to_version"]
