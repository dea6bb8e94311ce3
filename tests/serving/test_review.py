"""The review queue end to end inside one process: the quality predictor's V1/V2 calls, the
task route, batch items and the strategist queue their `review` decisions; the admin routes list
and decide them (404, 409, 422, the admin token); the expiry chore escalates; `/metrics` counts;
`contentml review` lists, shows and decides.

The quality predictor is the real `QualityModel` serving a stand-in version whose classifier
answers fixed probabilities: these tests are about what happens to its answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from kserve.protocol.infer_type import InferInput, InferRequest
from prometheus_client import CollectorRegistry

from contentml import events
from entrypoints.cli import main
from serving.admission import Admission, AdmissionMiddleware
from serving.backend.costs import CostLedger
from serving.backend.review import (
    EXPIRED,
    ReviewExpiry,
    register_review_metrics,
    review_router,
)
from serving.backend.tasks import Task, TaskAnswerer, tasks_router, validation_problem
from serving.caller.strategist import ContentStrategist
from serving.model_server.quality import QualityModel, QualityRequest, QualityVersion
from serving.model_server.versions import Serving, VersionWatcher
from tests.conftest import make_settings
from training.quality.review_store import ReviewStore, Source, Status

BORDERLINE = "a borderline joke about the referee"
FINE = "what a lovely goal"


class FixedClassifier:
    """Probabilities by text: a borderline one is unsure (review), any other clearly fine."""

    class calibration:  # noqa: N801 (the classifier's attribute)
        @staticmethod
        def classes(probabilities: np.ndarray) -> np.ndarray:
            return probabilities.argmax(axis=1)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        return np.array(
            [[0.1, 0.3, 0.6] if "borderline" in t else [0.0, 0.02, 0.98] for t in texts]
        )


class NoFindings:
    def check(self, text: str, kind) -> list:
        return []


@pytest.fixture
def settings(tmp_path):
    settings = make_settings(tmp_path / "state")
    events.configure(settings)
    return settings


@pytest.fixture
def store(settings) -> Iterator[ReviewStore]:
    store = ReviewStore.from_settings(settings)
    yield store
    store.close()


@pytest.fixture
def quality(settings) -> QualityModel:
    model = QualityModel("quality", settings)
    # `load()` without the registry: the review store and a stand-in version 7.
    model.reviews = ReviewStore.from_settings(settings)
    model.cache = None
    model._serving = Serving(QualityVersion("7", FixedClassifier(), NoFindings()))
    model.ready = True
    return model


@pytest.fixture
def answerer(settings, quality) -> Iterator[TaskAnswerer]:
    ledger = CostLedger.from_settings(settings)
    answerer = TaskAnswerer(settings, [quality], ledger)
    yield answerer
    answerer.close()
    ledger.close()


def app_for(answerer: TaskAnswerer, store: ReviewStore, **tokens: str) -> TestClient:
    api = FastAPI()
    api.add_middleware(AdmissionMiddleware, admission=Admission(32, **tokens))
    api.add_exception_handler(RequestValidationError, validation_problem)
    api.include_router(tasks_router(answerer, [Task.QUALITY]))
    api.include_router(review_router(store))
    return TestClient(api)


def only_item(store: ReviewStore):
    (item,) = store.list_items()
    return item


# --- where review decisions come from -------------------------------------------------------


def test_v1_queues_a_review_for_a_named_video_only(quality, store):
    answer = quality.predict_now(
        {
            "instances": [
                {"text": BORDERLINE, "channel": "sports", "video_id": "vid-1"},
                {"text": BORDERLINE + " again"},  # no video: not queued
                {"text": FINE, "video_id": "vid-2"},  # passes: not queued
            ]
        }
    )
    assert [p["decision"] for p in answer["predictions"]] == ["review", "review", "pass"]
    item = only_item(store)
    assert (item.text, item.channel, item.video_id, item.model_version, item.source) == (
        BORDERLINE,
        "sports",
        "vid-1",
        "7",
        "v1",
    )
    assert item.labels == pytest.approx(
        {"hate_speech": 0.1, "offensive_language": 0.3, "neither": 0.6}
    )
    assert item.reasons[0]["check"] == "classifier"


def test_v2_queues_a_review_with_one_video_id_for_every_text(quality, store):
    request = InferRequest(
        model_name="quality",
        infer_inputs=[
            InferInput("text", [2], "BYTES", [BORDERLINE, FINE]),
            InferInput("video_id", [1], "BYTES", ["vid-9"]),
        ],
    )
    quality.predict_now(request)
    item = only_item(store)
    assert (item.video_id, item.source, item.channel) == ("vid-9", "v2", None)


@pytest.mark.parametrize(
    "instance, problem",
    [
        ({"text": BORDERLINE, "video_id": ""}, "video_id"),
        ({"text": BORDERLINE, "channel": "a\x00b"}, "channel"),
        ({"text": BORDERLINE, "video_id": 12}, "video_id"),
    ],
)
def test_a_bad_channel_or_video_id_is_400_naming_it(quality, store, instance, problem):
    from kserve.errors import InvalidInput

    with pytest.raises(InvalidInput, match=problem):
        quality.predict_now({"instances": [instance]})
    assert store.list_items() == []


def test_the_cache_key_ignores_whom_a_text_is_for(quality):
    requests = [QualityRequest(text=FINE, video_id="a"), QualityRequest(text=FINE, channel="c")]
    first, second = quality.model_inputs(requests)
    assert first == second == {"text": FINE, "kind": "script"}


def test_the_task_route_queues_every_review_and_names_the_item(answerer, store):
    client = app_for(answerer, store)
    reviewed = client.post("/score/quality", json={"text": BORDERLINE, "video_id": "v1"})
    passed = client.post("/score/quality", json={"text": FINE})
    again = client.post("/score/quality", json={"text": BORDERLINE, "video_id": "v1"})
    no_video = client.post("/score/quality", json={"text": BORDERLINE})
    assert reviewed.status_code == 200 and reviewed.json()["decision"] == "review"
    assert passed.json()["review_item"] is None
    assert again.json()["review_item"] == reviewed.json()["review_item"]  # deduped
    assert no_video.json()["review_item"] not in (None, reviewed.json()["review_item"])
    items = {i.item_id: i for i in store.list_items()}
    assert items[reviewed.json()["review_item"]].seen == 2
    assert {i.source for i in items.values()} == {"task"}


def test_batch_items_queue_their_reviews_with_the_jobs_channel(answerer, store):
    bodies = [QualityRequest(text=BORDERLINE, video_id="b1"), QualityRequest(text=FINE)]
    answerer.answer(Task.QUALITY, bodies, "channel-7", source=Source.BATCH)
    answerer.answer(
        Task.QUALITY, [QualityRequest(text=BORDERLINE + "!")], "unassigned", source=Source.BATCH
    )
    first, second = store.list_items()
    assert (first.channel, first.video_id, first.source) == ("channel-7", "b1", "batch")
    assert second.channel is None  # a job booked to no channel


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "script",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def test_the_strategist_queues_its_scripts_reviews_with_their_video(settings, quality, store):
    script_text = "A borderline script about the derby."
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json=completion(script_text)))

    def score(text: str) -> dict[str, Any]:
        (answer,) = quality.answer([QualityRequest(text=text)])
        return answer

    with ContentStrategist.from_settings(
        settings, environ={}, quality=score, http_client=httpx.Client(transport=transport)
    ) as strategist:
        script = strategist.generate_script(
            "derby", "Calm football analysis.", channel="football", video_id="derby-1"
        )
        unscored = ContentStrategist.from_settings(
            settings,
            environ={},
            quality=lambda _: {"decision": "review"},  # malformed: no score
            http_client=httpx.Client(transport=transport),
        )
        with unscored:
            unscored.generate_script("derby", "Another persona.", video_id="derby-2")
    assert script.quality_decision.value == "review"
    scored, malformed = store.list_items()
    assert (scored.text, scored.source, scored.channel, scored.video_id) == (
        script_text,
        "strategist",
        "football",
        "derby-1",
    )
    assert scored.model_version == "7" and scored.labels["neither"] == pytest.approx(0.6)
    assert malformed.labels == {} and "malformed quality answer" in malformed.reasons[0]["detail"]


# --- the routes -----------------------------------------------------------------------------


def test_review_routes_list_show_and_decide(answerer, store):
    client = app_for(answerer, store)
    item_id = client.post("/score/quality", json={"text": BORDERLINE}).json()["review_item"]

    listed = client.get("/v1/review/items", params={"status": "pending"}).json()["items"]
    assert [i["item_id"] for i in listed] == [item_id]
    assert client.get(f"/v1/review/items/{item_id}").json()["text"] == BORDERLINE

    decided = client.post(
        f"/v1/review/items/{item_id}/decision", json={"decision": "reject", "note": "insult"}
    )
    assert decided.status_code == 200
    assert (decided.json()["status"], decided.json()["label"]) == ("rejected", "offensive_language")
    assert client.get("/v1/review/items").json()["items"] == []
    approved = client.get("/v1/review/items", params={"status": "rejected"}).json()["items"]
    assert [i["item_id"] for i in approved] == [item_id]

    again = client.post(f"/v1/review/items/{item_id}/decision", json={"decision": "approve"})
    assert again.status_code == 409 and "already decided" in again.json()["detail"]
    assert store.get(item_id).status is Status.REJECTED  # nothing stored was lost


@pytest.mark.parametrize(
    "method, path, body, status, named",
    [
        ("GET", "/v1/review/items?status=maybe", None, 422, "status"),
        ("GET", "/v1/review/items?limit=0", None, 422, "limit"),
        ("GET", "/v1/review/items/ffffffffffffffffffffffff", None, 404, "no review item"),
        (
            "POST",
            "/v1/review/items/ffffffffffffffffffffffff/decision",
            {"decision": "approve"},
            404,
            "no review item",
        ),
        ("POST", "/v1/review/items/ITEM/decision", {"decision": "maybe"}, 422, "decision"),
        (
            "POST",
            "/v1/review/items/ITEM/decision",
            {"decision": "reject", "label": "neither"},
            422,
            "label",
        ),
        (
            "POST",
            "/v1/review/items/ITEM/decision",
            {"decision": "approve", "extra": 1},
            422,
            "extra",
        ),
        (
            "POST",
            "/v1/review/items/ITEM/decision",
            {"decision": "approve", "note": "x" * 2001},
            422,
            "note",
        ),
    ],
)
def test_bad_review_requests_name_the_problem(answerer, store, method, path, body, status, named):
    client = app_for(answerer, store)
    item_id = client.post("/score/quality", json={"text": BORDERLINE}).json()["review_item"]
    response = client.request(method, path.replace("ITEM", item_id), json=body)
    assert response.status_code == status
    assert named in json.dumps(response.json())
    assert store.get(item_id).status is Status.PENDING


def test_review_routes_need_the_admin_token_where_one_is_set(answerer, store):
    client = app_for(answerer, store, token="caller", admin_token="admin")
    caller = {"Authorization": "Bearer caller"}
    admin = {"Authorization": "Bearer admin"}
    item_id = client.post("/score/quality", json={"text": BORDERLINE}, headers=caller).json()[
        "review_item"
    ]
    assert client.get("/v1/review/items").status_code == 401
    assert client.get("/v1/review/items", headers=caller).status_code == 403
    assert client.get(f"/v1/review/items/{item_id}", headers=caller).status_code == 403
    decision = f"/v1/review/items/{item_id}/decision"
    assert client.post(decision, json={"decision": "approve"}, headers=caller).status_code == 403
    assert client.get("/v1/review/items", headers=admin).status_code == 200
    assert client.post(decision, json={"decision": "approve"}, headers=admin).status_code == 200


# --- expiry and metrics ---------------------------------------------------------------------


def test_the_servers_periodic_loop_escalates_an_item_left_undecided(tmp_path, store, quality):
    settings = make_settings(tmp_path / "state", CONTENTML_REVIEW_EXPIRY_HOURS="0.0001")
    quality.predict_now({"instances": [{"text": BORDERLINE, "video_id": "late"}]})
    registry = CollectorRegistry()
    register_review_metrics(store, settings, registry)
    before = EXPIRED._value.get()
    watcher = VersionWatcher(settings, [], 60, chores=[ReviewExpiry(store, settings)])
    time.sleep(0.5)  # past 0.36 s
    watcher.poll_once(client=None)
    watcher.poll_once(client=None)
    item = only_item(store)
    assert item.status is Status.EXPIRED and item.expired_at is not None  # kept, escalated
    assert EXPIRED._value.get() == before + 1  # once
    assert registry.get_sample_value("contentml_review_items", {"status": "overdue"}) == 1
    assert registry.get_sample_value("contentml_review_items", {"status": "expired"}) == 1
    kinds = [e.kind.value for _, e in events.SqlBus(settings.backend_store).after(0)]
    assert kinds.count("review.expired") == 1 and kinds.count("review.created") == 1


# --- the CLI --------------------------------------------------------------------------------


def test_the_cli_lists_shows_and_decides(settings, quality, store, monkeypatch, capsys):
    monkeypatch.setenv("CONTENTML_HOME", str(settings.home))
    quality.predict_now({"instances": [{"text": BORDERLINE, "video_id": "cli-1"}]})
    quality.predict_now({"instances": [{"text": BORDERLINE + "?", "video_id": "cli-2"}]})
    capsys.readouterr()

    assert main(["review", "list", "--json"]) == 0
    first, second = json.loads(capsys.readouterr().out)["items"]
    assert first["video_id"] == "cli-1" and first["status"] == "pending"
    assert main(["review", "show", first["item_id"]]) == 0
    assert BORDERLINE in capsys.readouterr().out

    assert main(["review", "approve", first["item_id"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "neither"
    assert main(["review", "reject", second["item_id"], "--label", "hate_speech"]) == 0
    assert "labelled hate_speech" in capsys.readouterr().out
    assert main(["review", "list", "--status", "approved", "--json"]) == 0
    assert [i["item_id"] for i in json.loads(capsys.readouterr().out)["items"]] == [
        first["item_id"]
    ]

    assert main(["review", "reject", first["item_id"]]) == 2
    assert "already decided" in capsys.readouterr().err
    assert main(["review", "show", "nope"]) == 2
    assert "no review item 'nope'" in capsys.readouterr().err
    assert main(["review", "reject", second["item_id"], "--label", "neither"]) == 2
    assert store.get(first["item_id"]).status is Status.APPROVED
