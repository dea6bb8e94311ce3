"""The platform loop end to end, as a user runs it: `contentml demo`, then again reusing the
trend champion and retraining revenue, the registry commands, and `contentml serve` answering real
HTTP on a free port."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contentml import registry
from entrypoints.demo import free_port, model_server, trend_items
from serving.backend.batch.models import JobStatus
from serving.backend.batch.store import JobStore
from serving.backend.tasks import MAX_BODY_BYTES, TASKS, Task
from serving.caller.client import ClientError, ContentMLClient
from serving.server import batch_workers
from tests.conftest import DATA_DIR, make_settings, run_cli
from tests.helpers.registry import cli
from training.data import load_m4_hourly

pytestmark = pytest.mark.slow

MAX_SERIES = "2"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e") / "state"


@pytest.fixture(scope="module")
def first_demo(home: Path) -> dict:
    return demo(home, "--families", "trend,revenue")


def demo(home: Path, *args: str) -> dict:
    result = run_cli(home, "demo", "--max-series", MAX_SERIES, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_demo_ends_with_the_summary_line(first_demo: dict):
    assert first_demo["pipelines"] == {"trend": "training", "revenue": "optimization"}
    trend, revenue = first_demo["models"]["trend"], first_demo["models"]["revenue"]
    assert trend["version"] == "1"
    assert trend["aliases"] == {"challenger": "1", "champion": "1"}
    assert trend["endpoint"].endswith("/v1/models/trend:predict")
    assert trend["direction"] in {"up", "down"}
    assert revenue["arm"] in {"bold", "plain"} and revenue["study"] == "demo-channel"
    assert first_demo["tasks"]["/predict/trend"]["status"] == 200
    assert first_demo["batch"]["status"] == "done"
    assert first_demo["batch"]["succeeded"] + first_demo["batch"]["failed"] == 150
    assert set(first_demo["stage_seconds"]) >= {"pipelines", "server_start", "calls", "batch"}
    assert first_demo["seconds"] > 0


def test_a_second_demo_reuses_the_trend_champion_and_reruns_the_family_it_retrains(
    first_demo: dict, home: Path
):
    again = demo(home, "--families", "trend,revenue", "--retrain", "revenue")
    assert again["pipelines"] == {"revenue": "optimization"}  # trend's champion is reused
    assert again["models"]["revenue"]["study"] == "demo-channel"
    trend = again["models"]["trend"]
    reused = first_demo["models"]["trend"]
    assert (trend["version"], trend["aliases"]) == (reused["version"], reused["aliases"])
    assert trend["direction"] == reused["direction"]  # the same version, the same forecast
    assert again["batch"]["status"] == "done"

    listed = json.loads(run_cli(home, "models", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["trend"]
    assert [v["version"] for v in listed[0]["versions"]] == ["1"]
    assert listed[0]["aliases"] == trend["aliases"]


def test_an_unknown_family_is_a_usage_error(home: Path, monkeypatch, capsys):
    # In this process, which has the demo's code loaded: a child would spend seconds on it.
    settings = make_settings(home)
    status, _, err = cli(settings, monkeypatch, capsys, "demo", "--families", "trend,weather")
    assert status == 2
    assert "weather" in err and "trend, quality, niche, script, revenue" in err


@pytest.fixture(scope="module")
def server(first_demo: dict, home: Path) -> Iterator[str]:
    # No batch worker of its own: the batch test starts (and kills) the workers it needs.
    with model_server(make_settings(home), free_port(), "--workers", "0") as url:
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


# --- the backend's task routes -------------------------------------------------------------

TREND_SLA_SECONDS = 5.0


@pytest.fixture(scope="module")
def h1_history() -> list[float]:
    """The whole of series H1, one of the demo's: the history the champion was fitted on."""
    return load_m4_hourly(DATA_DIR / "m4-hourly" / "Hourly-train.csv", limit=1)["interest"].tolist()


@pytest.fixture(scope="module")
def champion(server: str, home: Path) -> str:
    listed = json.loads(run_cli(home, "models", "list", "--json").stdout)
    return listed[0]["aliases"]["champion"]


def post_trend(server: str, body: dict) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = httpx.post(f"{server}/predict/trend", json=body, timeout=30)
    return response, time.perf_counter() - started


def test_trend_route_answers_a_new_history_within_its_sla(server: str, champion: str):
    # Fitting a new history takes about 4 s of CPU: on a busy machine the model may miss the
    # SLA, and then the seasonal-naive forecast answers in time instead.
    history = [float(10 + (h % 24) + h / 100) for h in range(24 * 7)]
    response, seconds = post_trend(server, {"history": history})
    assert response.status_code == 200, response.text
    assert seconds < TREND_SLA_SECONDS
    answer = response.json()
    assert len(answer["forecast"]) == 48 and all(isinstance(f, float) for f in answer["forecast"])
    assert (answer["fallback"], answer["model_version"]) in {
        (False, champion),
        (True, "seasonal-naive"),
    }


def test_trend_route_answers_a_fitted_history_from_the_model(server: str, champion: str):
    history = [float(20 + (h % 24) - h / 50) for h in range(24 * 5)]
    # Fitted once without a deadline, the forecast is in the prediction cache.
    v1 = httpx.post(
        f"{server}/v1/models/trend:predict", json={"instances": [{"history": history}]}, timeout=60
    )
    assert v1.status_code == 200, v1.text
    (fitted,) = v1.json()["predictions"]
    response, seconds = post_trend(server, {"history": history})
    assert response.status_code == 200, response.text
    assert seconds < TREND_SLA_SECONDS
    answer = response.json()
    assert answer["fallback"] is False and answer["model_version"] == champion
    assert answer["forecast"] == fitted["forecast"] and len(answer["forecast"]) == 48
    assert answer["lower"] == fitted["lower"] and answer["direction"] == fitted["direction"]


def test_trend_route_answers_a_known_topic_from_its_precomputed_forecast(
    server: str, champion: str, h1_history: list[float]
):
    response, seconds = post_trend(server, {"history": h1_history, "topic": "H1", "horizon": 24})
    assert response.status_code == 200, response.text
    assert seconds < TREND_SLA_SECONDS
    answer = response.json()
    assert answer["topic"] == "H1" and answer["fallback"] is False
    assert answer["model_version"] == champion
    with ContentMLClient(server) as client:
        precomputed = client.predict_trend(series_id="H1", horizon=24)
    assert precomputed["source"] == "cache"
    assert answer["forecast"] == precomputed["forecast"]


HISTORY = [1.0] * 48


@pytest.mark.parametrize(
    ("body", "location"),
    [
        (b"{}", ["body", "history"]),
        (json.dumps({"history": [1.0] * 47}).encode(), ["body", "history"]),
        (json.dumps({"history": [1, "x", *HISTORY]}).encode(), ["body", "history", 1]),
        (b'{"history": [NaN' + b", 1.0" * 48 + b"]}", ["body", "history"]),
        (b'{"history": [1e999' + b", 1.0" * 48 + b"]}", ["body", "history"]),
        (json.dumps({"history": HISTORY, "horizon": 0}).encode(), ["body", "horizon"]),
        (json.dumps({"history": HISTORY, "topic": ""}).encode(), ["body", "topic"]),
        (json.dumps({"history": HISTORY, "colour": "red"}).encode(), ["body", "colour"]),
        (json.dumps([HISTORY]).encode(), ["body"]),
        (b"{not json", ["body", 1]),
    ],
)
def test_a_malformed_trend_body_gets_422_naming_the_field(server: str, body: bytes, location):
    response = httpx.post(
        f"{server}/predict/trend",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [location]


def test_a_trend_body_over_the_limit_gets_413(server: str):
    body = b'{"history": [' + b"1.0, " * (MAX_BODY_BYTES // 5) + b"1.0]}"
    assert len(body) > MAX_BODY_BYTES
    response = httpx.post(
        f"{server}/predict/trend",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413, response.text


def test_openapi_describes_every_task_route(server: str):
    schema = httpx.get(f"{server}/openapi.json").json()
    assert "post" in schema["paths"]["/predict/trend"]
    assert "history" in schema["components"]["schemas"]["TrendBody"]["properties"]
    assert "post" in schema["paths"]["/score/quality"]


def test_promote_rollback_history(first_demo: dict, home: Path, server: str):
    # Version 2: version 1's model registered again, as a rerun of its pipeline would.
    client = registry.connect(make_settings(home))
    first = client.get_model_version("trend", "1")
    assert str(client.create_model_version("trend", first.source, first.run_id).version) == "2"
    promoted = run_cli(home, "promote", "trend", "2", "--reason", "e2e")
    assert promoted.returncode == 0, promoted.stderr
    rolled = run_cli(home, "rollback", "trend")
    assert rolled.returncode == 0, rolled.stderr
    rolled_event = json.loads(rolled.stdout)
    assert rolled_event["from_version"] == "2"
    history = json.loads(run_cli(home, "history", "trend", "--json").stdout)
    assert [e["action"] for e in history][-2:] == ["promote", "rollback"]
    assert history[-1]["to_version"] == rolled_event["to_version"]


# --- batch jobs on the demo's champion -----------------------------------------------------


def worker_chunks(store: JobStore, pid: int) -> int:
    """Chunks a worker process holds now (worker ids are `<host>-<pid>-<random>`; with a
    negative staleness every claimed chunk counts as abandoned)."""
    return sum(1 for _, _, worker, _ in store.abandoned(-1.0) if f"-{pid}-" in worker)


def test_a_batch_survives_a_killed_worker_and_urgent_calls_keep_their_sla(server: str, home: Path):
    """1,000 trend items: a worker SIGKILLed while it holds a chunk, another started; every item
    ends in the results or the dead letters, none twice, and single requests made meanwhile
    are answered within the trend SLA."""
    settings = make_settings(home)
    store = JobStore(settings.backend_store)
    items = trend_items(settings, 1_001)
    probe, items = items[0], items[1:]
    with batch_workers(settings, 1) as (doomed,):
        deadline = time.monotonic() + 120
        while not any(f"-{doomed.pid}-" in w for w in store.live_workers()):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        job = httpx.post(f"{server}/batch/trend", json={"items": items}, timeout=60)
        assert job.status_code == 202, job.text
        job_id = job.json()["job_id"]
        while not worker_chunks(store, doomed.pid):
            assert time.monotonic() < deadline, "the worker never took a chunk"
            time.sleep(0.02)
        doomed.kill()
        doomed.wait()
    urgent = []
    with batch_workers(settings, 1):
        while store.report(job_id).status not in (JobStatus.DONE, JobStatus.FAILED):
            started = time.perf_counter()
            body = {"history": probe["history"], "horizon": 48}
            assert httpx.post(f"{server}/predict/trend", json=body, timeout=10).status_code == 200
            urgent.append(time.perf_counter() - started)
            assert time.monotonic() < deadline + 120, store.report(job_id)
            time.sleep(0.5)
    report = store.report(job_id)
    answered = [r["id"] for r in httpx.get(f"{server}/batch/jobs/{job_id}/results").json()]
    dead = [d.id for d in store.dead_letters(job_id)]
    assert len(answered) == len(set(answered)) and not set(answered) & set(dead)
    assert sorted(answered + dead) == sorted(item["id"] for item in items)
    assert (report.status, report.succeeded + report.failed) == (JobStatus.DONE, 1_000)
    assert urgent and max(urgent) < TASKS[Task.TREND].sla_seconds
    store.close()
