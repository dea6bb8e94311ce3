"""The content gate end to end, as a user runs it: `contentml quality train` and `predict` in a
subprocess, the CLI's one-line errors, `contentml serve` scoring texts over real HTTP, and the
review queue: a text the server sends to review, approved with `contentml review approve`,
becomes a training row of the next `contentml quality train`."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
import yaml

from entrypoints.demo import free_port, model_server
from serving.model_server.quality import MAX_TEXT_CHARS
from tests.conftest import make_settings, run_cli, wait_until
from tests.helpers.quality import CLEAN, TINY_RECIPE, sample_toxicity, write_csv
from tests.helpers.registry import cli
from training.data import TOXICITY_CLASSES
from training.quality import split, steps
from training.quality.pyfunc import PROBABILITY_COLUMNS

pytestmark = pytest.mark.slow

PREDICTION_COLUMNS = ["class", *PROBABILITY_COLUMNS]


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.reader(file))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quality-e2e")


@pytest.fixture(scope="module")
def files(workdir: Path) -> dict[str, Path]:
    """A class-balanced training sample of the real file, 25 held-out rows in the real file's
    format (blank id header, `tweet`), and the tiny recipe."""
    sample, rest = sample_toxicity(rows_per_class=400)
    sample.to_csv(workdir / "small.csv", index=False)
    rest.head(25).to_csv(workdir / "held.csv", index=False)
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY_RECIPE))
    return {
        "small": workdir / "small.csv",
        "held": workdir / "held.csv",
        "tiny": workdir / "tiny.yaml",
    }


@pytest.fixture(scope="module")
def home(workdir: Path) -> Path:
    return workdir / "state"


@pytest.fixture(scope="module")
def trained(home: Path, files: dict[str, Path]) -> dict:
    result = run_cli(
        home, "quality", "train", "--data", str(files["small"]), "--config", str(files["tiny"])
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- a server that starts before the first champion (first in the module: `home` is empty) --

POLL_SECONDS = 1.0
NOT_READY_ROUTES = [
    ("GET", "/v1/models/quality", None),
    ("GET", "/v2/models/quality/ready", None),
    ("POST", "/v1/models/quality:predict", {"instances": [{"text": "hi"}]}),
    (
        "POST",
        "/v2/models/quality/infer",
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]},
    ),
    ("POST", "/score/quality", {"text": "hi"}),
]


@pytest.fixture(scope="module")
def home_server(home: Path) -> Iterator[str]:
    """`contentml serve` on the module's home from before its first training, polling the
    registry every POLL_SECONDS: the first test watches it take up the first champion, and the
    serving tests use it afterwards (`server`)."""
    settings = make_settings(home, CONTENTML_SERVING_POLL_SECONDS=str(POLL_SECONDS))
    with model_server(settings, free_port(), "--workers", "0") as url:
        yield url


def wait_until_quality_is_served(url: str) -> None:
    # The poll starts the load within POLL_SECONDS; loading the encoders then takes seconds
    # more on a busy machine (6 s was missed by 0.1 s in a loaded fresh-clone run).
    def served() -> bool:
        return httpx.get(f"{url}/v2/models/quality/ready").status_code == 200

    wait_until(served, POLL_SECONDS + 60, "the new champion was not served", every=0.1)


def test_a_server_on_an_empty_home_serves_quality_once_training_beside_it_makes_a_champion(
    home_server: str, request
):
    url = home_server
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert "post" in httpx.get(f"{url}/openapi.json").json()["paths"]["/score/quality"]
    for method, path, body in NOT_READY_ROUTES:
        response = httpx.request(method, f"{url}{path}", json=body)
        assert response.status_code == 503, (path, response.text)
        problem = response.json().get("error") or response.json().get("detail")
        assert "no champion yet" in problem and "contentml quality train" in problem, path
    # Asked to load it, the server says what stands in the way: a conflict, not a 5xx.
    load = httpx.post(f"{url}/v2/repository/models/quality/load")
    assert load.status_code == 409 and "no champion yet" in load.json()["error"], load.text

    request.getfixturevalue("trained")  # `contentml quality train`: gated to champion
    wait_until_quality_is_served(url)
    scored = httpx.post(f"{url}/score/quality", json={"text": CLEAN})
    assert scored.status_code == 200, scored.text
    assert scored.json()["model_version"] == "1"


# --- training and batch prediction ---------------------------------------------------------


def test_train_ends_with_the_summary_line(trained: dict):
    assert trained["model"] == "quality"
    assert trained["version"] == "1"
    assert trained["gate"]["promoted"] is True
    assert trained["gate"]["metric"] == "weighted_f1"
    assert trained["rows"]["rows"] == 1_200
    assert trained["rows"]["train"] + trained["rows"]["evaluation"] == 1_200
    metrics = trained["metrics"]
    assert 0.0 <= metrics["weighted_f1"] <= 1.0
    assert 0.0 <= metrics["hate_speech_recall"] <= 1.0
    assert metrics["rows"] == trained["rows"]["evaluation"]
    assert trained["seconds"] > 0


def test_trained_model_is_the_champion(trained: dict, home: Path, monkeypatch, capsys):
    status, out, _ = cli(make_settings(home), monkeypatch, capsys, "models", "list", "--json")
    assert status == 0
    listed = json.loads(out)
    assert [m["name"] for m in listed] == ["quality"]
    assert listed[0]["aliases"] == {"challenger": "1", "champion": "1"}


def test_predict_writes_the_input_ids_then_class_and_probabilities(
    trained: dict, home: Path, files: dict[str, Path], workdir: Path
):
    output = workdir / "predictions.csv"
    result = run_cli(
        home, "quality", "predict", "--input", str(files["held"]), "--output", str(output)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 25 and summary["version"] == "1"

    held = read_rows(files["held"])
    rows = read_rows(output)
    assert rows[0] == ["", *PREDICTION_COLUMNS]  # the input's blank id header, kept
    assert [r[0] for r in rows[1:]] == [r[0] for r in held[1:]]
    predictions = pd.read_csv(output, dtype={0: str})
    assert len(predictions) == 25
    assert set(predictions["class"]) <= {0, 1, 2}
    assert ((predictions[PROBABILITY_COLUMNS].sum(axis=1) - 1.0).abs() < 1e-5).all()


def test_predict_reads_a_text_column_and_a_chosen_version(
    trained: dict, home: Path, workdir: Path, monkeypatch, capsys
):
    texts = write_csv(
        workdir / "texts.csv",
        [["video_id", "text"], ["007", CLEAN], ["010", ""], ["3", "you are an idiot"]],
    )
    output = workdir / "text-predictions.csv"
    argv = ["quality", "predict", "--input", str(texts), "--output", str(output)]
    status, _, err = cli(make_settings(home), monkeypatch, capsys, *argv, "--version", "1")
    assert status == 0, err
    rows = read_rows(output)
    assert rows[0] == ["video_id", *PREDICTION_COLUMNS]
    assert [r[0] for r in rows[1:]] == ["007", "010", "3"]


def test_evaluate_prints_the_model_and_its_ablations_on_the_evaluation_slice(
    trained: dict, home: Path, files: dict[str, Path], monkeypatch, capsys
):
    argv = ["quality", "evaluate", "--data", str(files["small"])]
    status, out, _ = cli(make_settings(home), monkeypatch, capsys, *argv)
    assert status == 0
    report = json.loads(out)
    assert (report["model"], report["version"]) == ("quality", "1")
    assert list(report["views"]) == ["stacked", "encoder", "lexical", "blend"]
    stacked = report["views"]["stacked"]["thresholded"]
    # The same slice and the same served model as the gate's score.
    assert stacked["weighted_f1"] == pytest.approx(trained["metrics"]["weighted_f1"])
    assert stacked["rows"] == trained["rows"]["evaluation"]


# --- CLI errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["quality", "predict", "--input", "{tmp}/nope.csv", "--output", "{tmp}/p.csv"],
         "nope.csv: file not found"),
        (["quality", "predict", "--input", "{tmp}/notext.csv", "--output", "{tmp}/p.csv"],
         "needs a column named one of ('tweet', 'text', 'title')"),
        (["quality", "train", "--data", "{tmp}/notext.csv", "--epochs", "0"],
         "argument --epochs: must be at least 1, not 0"),
        (["quality", "train", "--data", "{tmp}/nope.csv"], "nope.csv: file not found"),
        (["quality", "train", "--data", "{tmp}/notext.csv", "--config", "{tmp}/zero.yaml"],
         "epochs must be at least 1, not 0"),
        (["quality", "train", "--data", "{tmp}/notext.csv", "--config", "{tmp}/typo.yaml"],
         "unknown recipe fields ['epoch']"),
        (["quality", "train", "--data", "{tmp}/notext.csv", "--config", "{tmp}/nope.yaml"],
         "cannot read the recipe"),
        (["quality", "evaluate", "--data", "{tmp}/notext.csv"], "needs a column named one of"),
        (["quality", "evaluate", "--data", "{tmp}/nope.csv"], "nope.csv: file not found"),
    ],
)  # fmt: skip
def test_cli_errors_exit_2_with_one_line(argv, problem, tmp_path: Path, monkeypatch, capsys):
    write_csv(tmp_path / "notext.csv", [["id", "body"], ["1", "hello"]])
    (tmp_path / "zero.yaml").write_text("epochs: 0\n")
    (tmp_path / "typo.yaml").write_text("epoch: 3\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    status, _, err = cli(make_settings(tmp_path / "state"), monkeypatch, capsys, *argv)
    assert status == 2
    assert err.count("\n") == 1, err
    assert err.startswith("contentml: error: ")
    assert problem in err


@pytest.fixture(scope="module")
def predict_in_a_fresh_home(workdir: Path, files: dict[str, Path]) -> subprocess.CompletedProcess:
    output = workdir / "never.csv"
    return run_cli(
        workdir / "fresh",
        "quality",
        "predict",
        "--input",
        str(files["held"]),
        "--output",
        str(output),
    )


def test_predict_before_any_training_exits_2(predict_in_a_fresh_home, workdir: Path):
    assert predict_in_a_fresh_home.returncode == 2
    last = predict_in_a_fresh_home.stderr.strip().splitlines()[-1]
    assert last == (
        "contentml: error: model 'quality' has no champion: run `contentml quality train` first"
    )
    assert "Traceback" not in predict_in_a_fresh_home.stderr
    assert not (workdir / "never.csv").exists()


def test_predict_before_any_training_prints_only_the_error(predict_in_a_fresh_home):
    assert predict_in_a_fresh_home.stderr.count("\n") == 1, predict_in_a_fresh_home.stderr


def test_predict_with_a_version_that_does_not_exist_exits_2(
    trained: dict, home: Path, files: dict[str, Path], workdir: Path, monkeypatch, capsys
):
    argv = ["quality", "predict", "--input", str(files["held"]), "--output", str(workdir / "v.csv")]
    status, _, err = cli(make_settings(home), monkeypatch, capsys, *argv, "--version", "2")
    assert status == 2
    assert err.count("\n") == 1 and "has no version '2'" in err


# --- serving --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(home_server: str, trained: dict) -> str:
    """The module's server once it serves the trained champion. The home has no trend model:
    the server must skip trend."""
    wait_until_quality_is_served(home_server)
    return home_server


def predict(server: str, instances) -> httpx.Response:
    return httpx.post(
        f"{server}/v1/models/quality:predict", json={"instances": instances}, timeout=60
    )


def test_server_serves_quality_and_waits_for_a_trend_champion(server: str):
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    assert httpx.get(f"{server}/v1/models/quality").json() == {"name": "quality", "ready": True}
    waiting = httpx.get(f"{server}/v1/models/trend")
    assert waiting.status_code == 503
    assert "contentml pipeline run training --local" in waiting.json()["error"]


def test_v1_scores_a_batch_of_every_kind(server: str):
    instances = [
        {"text": "How to Fix a Leaky Faucet in 5 Minutes", "kind": "title"},
        {"text": "In this video we fix a leaky faucet with two tools.", "kind": "description"},
        {"text": CLEAN * 20, "kind": "script"},
    ]
    response = predict(server, instances)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3
    for prediction in predictions:
        assert 0.0 <= prediction["score"] <= 1.0
        assert prediction["decision"] in {"pass", "review", "reject"}
        assert set(prediction["labels"]) == set(TOXICITY_CLASSES)
        assert sum(prediction["labels"].values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction["score"] == prediction["labels"]["neither"]
        assert isinstance(prediction["reasons"], list)
        assert prediction["model_version"] == "1"


def test_a_text_without_kind_is_a_script_and_scores_alike_in_a_batch(server: str):
    alone = predict(server, [{"text": "subscribe for more"}]).json()["predictions"][0]
    batch = predict(server, [{"text": "hi"}, {"text": "subscribe for more", "kind": "script"}])
    assert batch.json()["predictions"][1]["score"] == pytest.approx(alone["score"], abs=1e-5)


def test_a_title_with_an_email_address_is_rejected(server: str):
    response = predict(
        server, [{"text": "Write to john.doe@example.com for a prize", "kind": "title"}]
    )
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert prediction["decision"] == "reject"
    personal = [r for r in prediction["reasons"] if r["check"] == "personal_data"]
    assert personal and personal[0]["severity"] == "reject"
    assert "john.doe" not in response.text  # the address is masked in the reason


def test_the_longest_allowed_script_is_scored(server: str):
    response = predict(server, [{"text": (CLEAN * 200)[:20_000], "kind": "script"}])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["decision"] in {"pass", "review", "reject"}


OK = {"text": "a fine title", "kind": "title"}


@pytest.mark.parametrize(
    ("instances", "problem"),
    [
        ([OK, {"text": ""}], "instance 1: text: Value error, text is empty"),
        ([{"text": " \n\t "}], "text is empty"),
        ([{"text": "x" * 20_001}], "text: String should have at most 20000 characters"),
        ([{"text": 42}], "text: Input should be a valid string"),
        ([{"text": ["a", "b"]}], "text: Input should be a valid string"),
        ([{"text": None}], "text: Input should be a valid string"),
        ([{"text": "hi", "kind": "tweet"}], "kind: Input should be 'script', 'title' or"),
        ([{"kind": "title"}], "instance 0: text: Field required"),
        ([{"text": "hi", "colour": "red"}], "colour: Extra inputs are not permitted"),
        (["just a string"], "instance 0"),
        ([], "'instances' must hold at least one instance"),
        ([OK] * 257, "at most 256 instances per call, got 257"),
    ],
)
def test_bad_v1_payloads_get_400_naming_the_problem(server: str, instances, problem: str):
    response = predict(server, instances)
    assert response.status_code == 400, response.text
    assert problem in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "content_type", "problem"),
    [
        (b"{not json", "application/json", "Unrecognized request format"),
        (b"{not json", "text/plain", "not valid JSON"),
        (b'{"rows": []}', "application/json", '{"instances": [...]}'),
        (b'{"instances": "hello"}', "application/json", '"instances" to be a list'),
    ],
)
def test_bodies_that_are_not_v1_requests_get_400(server: str, body, content_type, problem):
    response = httpx.post(
        f"{server}/v1/models/quality:predict",
        content=body,
        headers={"content-type": content_type},
    )
    assert response.status_code == 400, response.text
    assert problem in response.json()["error"]


def v2_infer(server: str, inputs: list[dict]) -> httpx.Response:
    return httpx.post(f"{server}/v2/models/quality/infer", json={"inputs": inputs}, timeout=60)


def test_v2_infer_scores_bytes_texts(server: str):
    texts = ["How to Fix a Leaky Faucet", "Write to john.doe@example.com"]
    response = v2_infer(
        server,
        [
            {"name": "text", "datatype": "BYTES", "shape": [2], "data": texts},
            {"name": "kind", "datatype": "BYTES", "shape": [1], "data": ["title"]},
        ],
    )
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["score"]["shape"] == [2]
    assert outputs["decision"]["shape"] == [2]
    assert outputs["decision"]["data"][1] == "reject"
    assert outputs["probabilities"]["shape"] == [2, 3]
    v1 = predict(server, [{"text": t, "kind": "title"} for t in texts]).json()["predictions"]
    assert outputs["score"]["data"] == pytest.approx([p["score"] for p in v1], abs=1e-6)


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        ([{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["hi"]}], "unknown input"),
        ([{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}], "must be BYTES"),
        ([{"name": "kind", "datatype": "BYTES", "shape": [1], "data": ["title"]}], "'text'"),
        (
            [
                {"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a", "b", "c"]},
                {"name": "kind", "datatype": "BYTES", "shape": [2], "data": ["title", "script"]},
            ],
            "one value or one per text",
        ),
        ([{"name": "text", "datatype": "BYTES", "shape": [1], "data": [" "]}], "text is empty"),
    ],
)
def test_bad_v2_inputs_get_400(server: str, inputs, problem: str):
    response = v2_infer(server, inputs)
    assert response.status_code == 400, response.text
    assert problem in response.json()["error"]


# --- the backend's task route ---------------------------------------------------------------

QUALITY_SLA_SECONDS = 2.0


def score(server: str, body) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = httpx.post(f"{server}/score/quality", json=body, timeout=30)
    return response, time.perf_counter() - started


def test_quality_route_scores_within_its_sla_as_v1_does(server: str, trained: dict):
    body = {"text": "How to Fix a Leaky Faucet in 5 Minutes", "kind": "title"}
    response, seconds = score(server, body)
    assert response.status_code == 200, response.text
    assert seconds < QUALITY_SLA_SECONDS
    answer = response.json()
    assert 0.0 <= answer["score"] <= 1.0
    assert answer["decision"] in {"pass", "review", "reject"}
    assert isinstance(answer["reasons"], list)
    assert answer["model_version"] == trained["version"]
    (v1,) = predict(server, [body]).json()["predictions"]
    assert answer["score"] == pytest.approx(v1["score"], abs=1e-6)


def test_quality_route_rejects_a_title_with_an_email_address(server: str):
    response, _ = score(server, {"text": "Write to john.doe@example.com", "kind": "title"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["decision"] == "reject"
    assert "personal_data" in [r["check"] for r in answer["reasons"]]


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"text": ""}, ["body", "text"]),
        ({"text": " \n\t "}, ["body", "text"]),
        ({"text": "x" * (MAX_TEXT_CHARS + 1)}, ["body", "text"]),
        ({"text": 42}, ["body", "text"]),
        ({"text": ["a", "b"]}, ["body", "text"]),
        ({"kind": "title"}, ["body", "text"]),
        ({"text": "hi", "kind": "tweet"}, ["body", "kind"]),
        ({"text": "hi", "colour": "red"}, ["body", "colour"]),
    ],
)
def test_a_malformed_quality_body_gets_422_naming_the_field(server: str, body, location):
    response, _ = score(server, body)
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [location]


def test_a_quality_body_with_a_nan_gets_422_not_500(server: str):
    # Python's JSON parser reads the NaN literal; the 422 must still render.
    response = httpx.post(
        f"{server}/score/quality",
        content=b'{"text": NaN}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [["body", "text"]]


def test_openapi_describes_the_quality_route(server: str):
    schema = httpx.get(f"{server}/openapi.json").json()
    assert "post" in schema["paths"]["/score/quality"]
    assert "text" in schema["components"]["schemas"]["QualityRequest"]["properties"]
    # No trend champion in this home: the route answers with the seasonal-naive fallback.
    assert "/predict/trend" in schema["paths"]
    body = {"history": [float(h % 24) for h in range(72)], "horizon": 24}
    forecast = httpx.post(f"{server}/predict/trend", json=body, timeout=10).json()
    assert (forecast["fallback"], forecast["model_version"]) == (True, "seasonal-naive")


# --- the review queue feeds the next training (last: it trains version 2 in `home`) --------

REVIEW_CANDIDATES = [
    "you people are something else",
    "that ref was trash lol",
    "what a dumb idea",
    "I hate mondays so much",
    "this song is sick, kill it with fire",
    "honestly the worst take I have heard all week",
]
"""Texts a tiny model is unsure about: at least one of them is sent to review."""


def test_a_reviewed_text_becomes_a_training_row_of_the_next_run(
    server: str, trained: dict, home: Path, files: dict[str, Path], tmp_path: Path
):
    assert trained["rows"]["review_rows"] == 0
    answers = [
        httpx.post(
            f"{server}/score/quality",
            json={"text": text, "channel": "e2e", "video_id": f"vid-{i}"},
            timeout=30,
        ).json()
        for i, text in enumerate(REVIEW_CANDIDATES)
    ]
    reviewed = [a for a in answers if a["decision"] == "review"]
    assert reviewed, answers
    item_id = reviewed[0]["review_item"]

    listed = run_cli(home, "review", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    items = {i["item_id"]: i for i in json.loads(listed.stdout)["items"]}
    # The module's other tests may have sent texts to review too.
    assert {a["review_item"] for a in reviewed} <= set(items)
    assert (items[item_id]["channel"], items[item_id]["model_version"]) == ("e2e", "1")
    approved = run_cli(home, "review", "approve", item_id)
    assert approved.returncode == 0 and "labelled neither" in approved.stdout

    retrained = run_cli(
        home, "quality", "train", "--data", str(files["small"]), "--config", str(files["tiny"])
    )
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    second = json.loads(retrained.stdout.strip().splitlines()[-1])
    assert second["rows"]["review_rows"] == 1
    assert second["rows"]["train"] == trained["rows"]["train"] + 1
    assert second["rows"]["evaluation"] == trained["rows"]["evaluation"]
    settings = make_settings(home)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    runs = mlflow.search_runs(experiment_names=[settings.mlflow_experiment])
    assert sorted(runs["params.review_rows"]) == ["0", "1"]

    frame = tmp_path / "frame.parquet"
    steps.ingest_toxicity(files["small"], frame, settings)
    rows = pd.read_parquet(frame)
    (row,) = rows[rows["id"].str.startswith("review-")].itertuples()
    text = items[item_id]["text"]
    assert (row.text, row.label, split.split_of(row.id)) == (text, 2, split.Split.TRAIN)
