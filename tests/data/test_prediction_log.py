"""The prediction log and performance monitoring: records written to parquet off the request
path and read back, a full queue dropping instead of blocking, `off`, the cost of `record()`,
a served trend request logged under the id it returns, ground truth joined by request id,
rolling metrics on known answers and the drop against the metric logged at registration.

The served model is a real trend model (two seasonal-naive members: trained in a second)
registered through the training pipeline's `register` step with its metrics."""

from __future__ import annotations

import datetime
import http.server
import json
import threading
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from kserve.protocol.infer_type import InferInput, InferRequest
from prometheus_client import REGISTRY
from sklearn.dummy import DummyRegressor

from contentml import registry
from contentml.settings import Settings
from feature_repo.niche_schema import FEATURES
from monitoring import performance
from monitoring.performance import (
    METRICS,
    Family,
    PerformanceError,
    compare_with_registration,
    family_of,
    join_ground_truth,
    performance_drop,
    registered_metric,
    rolling_performance,
)
from serving.model_server import niche as niche_model
from serving.model_server.prediction_log import (
    SCHEMA,
    PredictionLog,
    PredictionLogError,
    open_prediction_log,
    read_predictions,
)
from serving.model_server.trend import TrendModel
from serving.model_server.versions import Serving, ServingOptions
from tests.conftest import make_settings
from training.register import register
from training.trend.ensemble import EnsembleConfig
from training.trend.forecasters import Member
from training.trend.train import log_saved_model, train

HOURS = np.arange(24 * 28)
BASE = 100 + 20 * np.sin(2 * np.pi * HOURS / 24)
HISTORY = {"history": BASE[-336:].round(3).tolist(), "horizon": 24}
"""A realistic trend instance: two weeks of hourly history, a day ahead."""

TREND_ANSWER = {
    "forecast": BASE[:24].round(3).tolist(),
    "lower": (BASE[:24] - 5).round(3).tolist(),
    "upper": (BASE[:24] + 5).round(3).tolist(),
    "lower_95": (BASE[:24] - 9).round(3).tolist(),
    "upper_95": (BASE[:24] + 9).round(3).tolist(),
    "direction": "up",
    "source": "fitted",
}
QUALITY_INPUT = {"text": "10 tomato varieties for small gardens " * 8, "kind": "script"}
QUALITY_ANSWER = {
    "score": 0.93,
    "decision": "pass",
    "class": 2,
    "confidence": 0.93,
    "labels": {"hate_speech": 0.01, "offensive_language": 0.06, "neither": 0.93},
    "reasons": [],
}
RECORD_CALLS = 10_000
RECORD_P99_BOUND_MS = 5.0
"""Loose on purpose (shared CI cores); the target is < 1 ms p99 and the measured figures are
printed. Timing targets are checked by benchmarks, not unit tests."""


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def dropped(model: str, reason: str) -> float:
    return sample("contentml_prediction_log_dropped_total", model=model, reason=reason)


def parts(root: Path) -> list[Path]:
    return sorted(root.glob("model=*/date=*/part-*.parquet"))


# --- the log ---------------------------------------------------------------------------------


def test_records_are_written_to_parquet_and_read_back_with_every_field(tmp_path: Path):
    root = tmp_path / "log"
    before = time.time()
    with PredictionLog(root) as log:
        assert log.record("trend", "3", "req-1", [HISTORY, HISTORY], [TREND_ANSWER] * 2, 0.012)
        assert log.record("quality", "1", "req-2", [QUALITY_INPUT], [QUALITY_ANSWER], 0.004)
        answer = {**QUALITY_ANSWER, "class": np.int64(1)}  # numpy values are plain JSON
        assert log.record("quality", "1", "req-3", [QUALITY_INPUT], [answer], 0.005, [4])

    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    files = parts(root)
    assert {(f.parent.parent.name, f.parent.name) for f in files} == {
        ("model=trend", f"date={today}"),
        ("model=quality", f"date={today}"),
    }
    assert not list(root.rglob("*.tmp"))  # written under a temporary name, then renamed

    trend = read_predictions(root, "trend")
    assert list(trend.columns) == SCHEMA.names
    assert trend["request_id"].tolist() == ["req-1", "req-1"]
    assert trend["index"].tolist() == [0, 1]
    assert set(trend["model"]) == {"trend"} and set(trend["version"]) == {"3"}
    assert trend["latency_ms"].tolist() == pytest.approx([12.0, 12.0])
    assert str(trend["timestamp"].dt.tz) == "UTC"
    assert (trend["timestamp"] >= pd.Timestamp(before, unit="s", tz="UTC").floor("s")).all()
    assert json.loads(trend["inputs"][0]) == HISTORY
    assert json.loads(trend["outputs"][1]) == TREND_ANSWER

    quality = read_predictions(root, "quality")
    assert quality["request_id"].tolist() == ["req-2", "req-3"]
    assert quality["index"].tolist() == [0, 4]  # the instance's position in its request
    assert json.loads(quality["outputs"][1])["class"] == 1
    assert read_predictions(root, "niche-music").empty

    # `since`: the day partitions and the timestamps both filter.
    assert len(read_predictions(root, "trend", since=datetime.date.today())) == 2
    tomorrow = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    assert read_predictions(root, "trend", since=tomorrow).empty


def test_the_writer_flushes_every_n_rows_and_every_t_seconds(tmp_path: Path):
    by_rows, by_time = tmp_path / "rows", tmp_path / "time"
    with (
        PredictionLog(by_rows, flush_rows=3, flush_seconds=60) as rows_log,
        PredictionLog(by_time, flush_rows=1_000, flush_seconds=0.2) as time_log,
    ):
        rows_log.record("trend", "1", "a", [HISTORY] * 2, [TREND_ANSWER] * 2, 0.01)
        time_log.record("trend", "1", "b", [HISTORY], [TREND_ANSWER], 0.01)
        rows_log.record("trend", "1", "c", [HISTORY], [TREND_ANSWER], 0.01)  # 3 rows: written
        deadline = time.monotonic() + 10
        while not (parts(by_rows) and parts(by_time)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(parts(by_rows)) == 1 and len(parts(by_time)) == 1
        rows_log.record("trend", "1", "d", [HISTORY], [TREND_ANSWER], 0.01)
        assert rows_log.flush()
        assert len(parts(by_rows)) == 2
    assert read_predictions(by_rows, "trend")["request_id"].tolist() == ["a", "a", "c", "d"]


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path):
    log = PredictionLog(tmp_path / "log", queue_size=2)  # not started: nothing drains it
    full = dropped("trend", "queue_full")
    assert log.record("trend", "1", "a", [HISTORY], [TREND_ANSWER], 0.01)
    assert log.record("trend", "1", "b", [HISTORY], [TREND_ANSWER], 0.01)
    started = time.perf_counter()
    assert not log.record("trend", "1", "c", [HISTORY] * 3, [TREND_ANSWER] * 3, 0.01)
    assert time.perf_counter() - started < 0.05  # did not wait for room
    assert dropped("trend", "queue_full") == full + 3  # counted per instance

    closed = dropped("trend", "closed")
    log.close()
    assert not log.record("trend", "1", "d", [HISTORY], [TREND_ANSWER], 0.01)
    assert dropped("trend", "closed") == closed + 1


def test_an_unserializable_answer_drops_its_request_only(tmp_path: Path):
    before = dropped("quality", "unserializable")
    with PredictionLog(tmp_path / "log") as log:
        log.record("quality", "1", "bad", [QUALITY_INPUT], [{"score": object()}], 0.01)
        log.record("quality", "1", "good", [QUALITY_INPUT], [QUALITY_ANSWER], 0.01)
    assert read_predictions(tmp_path / "log", "quality")["request_id"].tolist() == ["good"]
    assert dropped("quality", "unserializable") == before + 1


def test_the_log_is_on_by_default_and_off_disables_it(tmp_path: Path):
    settings = make_settings(tmp_path / "state")
    assert settings.prediction_log == str(tmp_path / "state" / "predictions")
    log = open_prediction_log(settings)
    assert log is not None
    log.record("trend", "1", "a", [HISTORY], [TREND_ANSWER], 0.01)
    log.close()
    assert len(read_predictions(settings, "trend")) == 1

    off = make_settings(tmp_path / "off", CONTENTML_PREDICTION_LOG="off")
    assert open_prediction_log(off) is None
    with pytest.raises(PredictionLogError, match="off"):
        read_predictions(off, "trend")


def percentiles_us(timings_ns: list[int]) -> dict[str, float]:
    micros = np.asarray(timings_ns) / 1_000
    return {
        "p50_us": round(float(np.percentile(micros, 50)), 1),
        "p99_us": round(float(np.percentile(micros, 99)), 1),
        "max_us": round(float(micros.max()), 1),
    }


def test_record_costs_microseconds_while_the_writer_flushes(tmp_path: Path):
    """The request path's share: `record()` of a trend (1 instance) or quality (4 instances)
    request, 10,000 calls each, while the writer encodes and writes a part file every 500
    requests."""
    results = {}
    with PredictionLog(tmp_path / "log", queue_size=50_000, flush_rows=500) as log:
        for name, inputs, outputs in (
            ("trend", [HISTORY], [TREND_ANSWER]),
            ("quality", [QUALITY_INPUT] * 4, [QUALITY_ANSWER] * 4),
        ):
            timings = []
            for i in range(RECORD_CALLS):
                started = time.perf_counter_ns()
                log.record(name, "1", f"req-{i}", inputs, outputs, 0.01)
                timings.append(time.perf_counter_ns() - started)
            results[name] = percentiles_us(timings)
    print(f"\nrecord() over {RECORD_CALLS} calls each, writer flushing: {results}")
    assert len(parts(tmp_path / "log")) >= 2 * RECORD_CALLS // 500 // 4  # it was writing
    assert len(read_predictions(tmp_path / "log", "trend")) == RECORD_CALLS
    for figures in results.values():
        assert figures["p99_us"] < RECORD_P99_BOUND_MS * 1000, results


# --- a served request ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("prediction-log") / "state")


@pytest.fixture(scope="module")
def client(settings: Settings):
    return registry.connect(settings)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    quick = EnsembleConfig(members=(Member.SEASONAL_NAIVE_DAY, Member.SEASONAL_NAIVE_WEEK))
    folder = tmp_path_factory.mktemp("trend-model") / "model"
    train({f"S{i}": BASE * (i + 1) for i in range(3)}, quick, folder, workers=1)
    return folder


@pytest.fixture(scope="module")
def champion(settings: Settings, client, model_dir: Path) -> str:
    """Version 1 of `trend`, registered by the pipeline's step with its metrics; champion."""
    metrics = {"smape": 12.5, "owa": 0.9}
    version = register(settings, "trend", model_dir, {}, metrics, run_name="test")
    registry.promote(client, "trend", version, reason="test")
    return version


def test_a_served_request_is_logged_under_the_request_id_it_returns(settings, champion, tmp_path):
    with PredictionLog(tmp_path / "log", flush_seconds=60) as log:
        model = TrendModel("trend", settings, ServingOptions(prediction_log=log))
        assert model.load()
        other = {"history": (BASE[-336:] * 2).round(3).tolist(), "horizon": 24}
        given = model.predict_now({"instances": [HISTORY, other]}, {"x-request-id": "req-7"})
        generated = model.predict_now({"instances": [HISTORY]})
        v2 = InferRequest(
            model_name="trend",
            infer_inputs=[InferInput("history", [1, 336], "FP64", [HISTORY["history"]])],
            request_id="v2-9",
        )
        assert model.predict_now(v2, {"x-request-id": "ignored"}).id == "v2-9"
        assert log.flush()
        logged = read_predictions(tmp_path / "log", "trend")

    assert given["request_id"] == "req-7"
    assert uuid.UUID(generated["request_id"]).version == 4
    assert [p["model_version"] for p in given["predictions"]] == [champion, champion]
    assert logged["request_id"].tolist() == ["req-7", "req-7", generated["request_id"], "v2-9"]
    assert logged["index"].tolist() == [0, 1, 0, 0]
    assert set(logged["version"]) == {champion}
    assert (logged["latency_ms"] > 0).all()
    first = json.loads(logged["outputs"][0])
    assert first["forecast"] == given["predictions"][0]["forecast"]
    assert json.loads(logged["inputs"][1]) == other

    # Ground truth arrives later, by request id and index; the forecast met it exactly on
    # instance 0 and was 10 % high on instance 1.
    second = np.asarray(given["predictions"][1]["forecast"])
    truth = pd.DataFrame(
        {
            "request_id": ["req-7", "req-7", "never-served"],
            "index": [0, 1, 0],
            "actual": [first["forecast"], (second / 1.1).tolist(), [1.0]],
        }
    )
    joined = join_ground_truth(logged, truth)
    assert joined["request_id"].tolist() == ["req-7", "req-7"]
    window = rolling_performance(joined, family_of("trend"), "1D")
    (value,) = window["value"]
    expected = 100 * 2 * 0.1 / 2.1 / 2  # sMAPE of a 10 % over-forecast, averaged with a 0
    assert value == pytest.approx(expected)
    compared = compare_with_registration(registry.connect(settings), window)
    assert compared["registered"].tolist() == [12.5]
    assert compared["drop"].tolist() == pytest.approx([(expected - 12.5) / 12.5])  # better


def test_the_log_costs_little_end_to_end(settings, champion, tmp_path):
    """A served request (a cache hit: the cheapest, so the log's share is the largest) with the
    log on and off, in process."""
    figures = {}
    with PredictionLog(tmp_path / "log", flush_rows=500) as log:
        for name, options in (
            ("off", ServingOptions()),
            ("on", ServingOptions(prediction_log=log)),
        ):
            model = TrendModel("trend", settings, options)
            model.load()
            model.predict_now({"instances": [HISTORY]})  # fills the cache
            timings = []
            for _ in range(2_000):
                started = time.perf_counter_ns()
                model.predict_now({"instances": [HISTORY]})
                timings.append(time.perf_counter_ns() - started)
            figures[name] = percentiles_us(timings)
    print(f"\nserved trend request (cache hit), log off vs on: {figures}")
    assert len(read_predictions(tmp_path / "log", "trend")) == 2_001


def test_the_niche_router_logs_each_instance_under_its_niche_model(settings, monkeypatch, tmp_path):
    """Instances routed to different niche models keep their position in the request. The
    estimators are real (constant regressors); Feast's channel history is replaced."""
    monkeypatch.setattr(
        niche_model,
        "_feature_rows",
        lambda histories, own, videos: [
            dict.fromkeys(FEATURES, float(i)) for i in range(len(videos))
        ],
    )
    video = {
        "channel_id": "c1",
        "country": "US",
        "title": "Tomatoes",
        "views": 10,
        "likes": 1,
        "dislikes": 0,
        "comment_total": 0,
        "trending_date": "2018-06-14",
    }
    with PredictionLog(tmp_path / "log") as log:
        options = ServingOptions(prediction_log=log)
        router = niche_model.NicheRouter("niche", settings, options)
        router.niches = {}
        for niche, value in (("global", 1.0), ("music", 2.0)):
            model = niche_model.NicheModel(f"niche-{niche}", settings, options)
            estimator = DummyRegressor(strategy="constant", constant=value).fit([[0.0]], [value])
            model.histories, model.own_features, model.cache = None, None, None
            model._serving = Serving(niche_model.NicheVersion("3", estimator))
            model.ready = True
            router.niches[niche] = model
        categories = ["Music", "Cooking", "Music"]
        response = router.predict_now(
            {"instances": [{**video, "category": c} for c in categories]}, {"x-request-id": "r1"}
        )
    assert response["request_id"] == "r1"
    routed = [p["model"] for p in response["predictions"]]
    assert routed == ["niche-music", "niche-global", "niche-music"]
    music = read_predictions(tmp_path / "log", "niche-music")
    assert music["index"].tolist() == [0, 2] and set(music["request_id"]) == {"r1"}
    fallback = read_predictions(tmp_path / "log", "niche-global")
    assert fallback["index"].tolist() == [1]
    assert json.loads(fallback["outputs"][0]) == {"log_views_gained": 1.0}


def test_registered_metric_reads_the_registering_run(settings, client, champion, model_dir):
    assert registered_metric(client, "trend", champion) == 12.5
    with mlflow.start_run(experiment_id=registry.experiment_id(client, settings)):
        bare = str(log_saved_model(model_dir, "trend").registered_model_version)
    with pytest.raises(PerformanceError, match="logged no 'smape'"):
        registered_metric(client, "trend", bare)


# --- performance on known answers -------------------------------------------------------------


def logged_frame(model: str, version: str, rows: list[tuple[str, int, str, dict]]) -> pd.DataFrame:
    """A frame as `read_predictions` returns it: (request_id, index, UTC time, answer)."""
    return pd.DataFrame(
        {
            "timestamp": pd.to_datetime([r[2] for r in rows], utc=True),
            "model": model,
            "version": version,
            "request_id": [r[0] for r in rows],
            "index": np.asarray([r[1] for r in rows], dtype="int32"),
            "latency_ms": 1.0,
            "inputs": "{}",
            "outputs": [json.dumps(r[3]) for r in rows],
        }
    )


def test_trend_smape_per_window_and_version():
    predictions = logged_frame(
        "trend",
        "2",
        [
            ("a", 0, "2024-05-01T10:00", {"forecast": [100.0, 100.0]}),
            ("a", 1, "2024-05-01T11:00", {"forecast": [50.0, 50.0]}),
            ("b", 0, "2024-05-02T09:00", {"forecast": [110.0, 110.0]}),
            ("c", 0, "2024-05-02T10:00", {"forecast": [100.0]}),  # no truth yet
        ],
    )
    truth = pd.DataFrame(
        {
            "request_id": ["a", "a", "b", "b"],
            "index": [0, 1, 0, 0],
            "actual": [[100.0, 100.0], [50.0, 50.0], [0.0, 0.0], [90.0]],  # b corrected later
        }
    )
    joined = join_ground_truth(predictions, truth)
    assert len(joined) == 3
    result = rolling_performance(joined, Family.TREND, "1D")
    assert result["window"].dt.day.tolist() == [1, 2]
    assert result["rows"].tolist() == [2, 1]
    assert set(result["metric"]) == {"smape"}
    # Day 2: only the hour that has happened is scored: |110 - 90| * 2 / 200 = 20 %.
    assert result["value"].tolist() == pytest.approx([0.0, 20.0])


def test_quality_weighted_f1_and_niche_rmse():
    quality = logged_frame(
        "quality",
        "1",
        [(f"q{i}", 0, "2024-05-01T10:00", {"class": c}) for i, c in enumerate([2, 2, 1, 0])],
    )
    truth = pd.DataFrame(
        {"request_id": ["q0", "q1", "q2", "q3"], "index": 0, "actual": [2, "neither", 1, 1]}
    )
    (f1,) = rolling_performance(join_ground_truth(quality, truth), "quality", "1D")["value"]
    # neither: 2/2 right (F1 1); offensive: 1 of 2 found (F1 2/3); hate: 1 false alarm (F1 0).
    assert f1 == pytest.approx((2 * 1.0 + 2 * (2 / 3) + 0 * 0.0) / 4)

    niche = logged_frame(
        "niche-music",
        "4",
        [(f"n{i}", i, "2024-05-01T10:00", {"log_views_gained": p}) for i, p in enumerate([5, 8])],
    )
    truth = pd.DataFrame({"request_id": ["n0", "n1"], "index": [0, 1], "actual": [2.0, 12.0]})
    result = rolling_performance(join_ground_truth(niche, truth), family_of("niche-music"), "1h")
    assert result["value"].tolist() == pytest.approx([np.sqrt((9 + 16) / 2)])
    assert result["metric"].tolist() == ["rmse"]


@pytest.mark.parametrize(
    ("current", "registered", "greater_is_better", "drop"),
    [
        (0.76, 0.80, True, 0.05),  # F1 5 % lower
        (10.5, 10.0, False, 0.05),  # sMAPE 5 % higher
        (0.84, 0.80, True, -0.05),  # better
        (9.0, 10.0, False, -0.1),
        (1.0, 1.0, False, 0.0),
        (0.5, 0.0, False, float("inf")),  # a perfect registered error
        (0.0, 0.0, False, 0.0),
    ],
)
def test_performance_drop(current, registered, greater_is_better, drop):
    assert performance_drop(current, registered, greater_is_better) == pytest.approx(drop)


def test_the_families_match_what_training_logs():
    assert METRICS[Family.TREND].registered == "smape"  # training/trend/backtest.py
    assert METRICS[Family.QUALITY].registered == "weighted_f1"  # quality GATE_METRIC
    assert METRICS[Family.NICHE].registered == "validation_rmse"  # training/niche/automl.py
    assert family_of("niche-global") is Family.NICHE
    with pytest.raises(PerformanceError, match="script"):
        family_of("script")
    with pytest.raises(PerformanceError, match="actual"):
        join_ground_truth(logged_frame("trend", "1", []), pd.DataFrame({"request_id": []}))


def test_the_performance_drop_is_pushed_to_the_pushgateway(tmp_path):
    received: list[tuple[str, str]] = []

    class Pushgateway(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802 (the handler API's name)
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            received.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pushgateway) as gateway:
        threading.Thread(target=gateway.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{gateway.server_address[1]}"
        settings = make_settings(tmp_path / "state", CONTENTML_PUSHGATEWAY_URL=url)
        assert performance.publish_drop(settings, "quality", 0.07)
        gateway.shutdown()
    ((path, body),) = received
    assert path == "/metrics/job/contentml-monitoring/model/quality"
    assert 'contentml_model_performance_drop{model="quality"} 0.07' in body
    assert not performance.publish_drop(make_settings(tmp_path / "other"), "quality", 0.07)
