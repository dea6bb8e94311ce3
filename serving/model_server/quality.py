"""KServe predictor for the content gate (`/v1/models/quality:predict`, V2 `infer`).

A request may name the `channel` and `video_id` a text is for: they do not change the answer
(nor its cache key), but a text the gate sends to `review` for a named video is queued for a
person (`training/quality/review_store.py`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydantic
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest
from prometheus_client import Counter

from serving.model_server.payloads import instances_from_v1, parse_instances
from serving.model_server.versions import CachedPredictor, load_pyfunc
from training.data import load_texts
from training.quality.gate import decide
from training.quality.policy import PolicyChecker, TextKind, load_policy
from training.quality.review_store import ReviewStore, Source, check_name

logger = logging.getLogger(__name__)

REVIEW_FAILURES = Counter(
    "contentml_review_queue_failures",
    "Texts the gate sent to review that could not be queued for a person (the answer was "
    "still given)",
)

MAX_TEXT_CHARS = 20_000
"""Longer texts are refused: a script is well under this, and the cost grows with length."""

MAX_INSTANCES = 256
"""A larger batch belongs in a batch job (`contentml quality predict`), not a call."""


class QualityRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    text: pydantic.StrictStr = pydantic.Field(max_length=MAX_TEXT_CHARS)
    kind: TextKind = TextKind.SCRIPT
    channel: pydantic.StrictStr | None = pydantic.Field(
        None, description="The channel the text is for (kept with a review item)."
    )
    video_id: pydantic.StrictStr | None = pydantic.Field(
        None, description="The video the text is for: a `review` for it is queued for a person."
    )

    @pydantic.field_validator("text")
    @classmethod
    def not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("text is empty")
        return text

    @pydantic.field_validator("channel", "video_id")
    @classmethod
    def a_name(cls, value: str | None, info: pydantic.ValidationInfo) -> str | None:
        return check_name(value, info.field_name)


@dataclass(frozen=True)
class QualityVersion:
    version: str
    classifier: Any
    """The version's `QualityClassifier` (encoder, lexical model, calibration)."""
    policy: PolicyChecker
    """The policy lists the version was registered with, over the published texts."""


class QualityModel(CachedPredictor[QualityVersion, QualityRequest]):
    train_command = "contentml quality train"

    def load(self) -> bool:
        self.published = load_texts(self.settings.published_content)["text"]
        self.reviews = ReviewStore.from_settings(self.settings)
        return super().load()

    def load_version(self, version: str) -> QualityVersion:
        classifier = load_pyfunc(self.name, version).unwrap_python_model()
        policy = PolicyChecker(load_policy(classifier.policy_path), self.published)
        return QualityVersion(version, classifier, policy)

    def parse(self, payload: dict | InferRequest) -> list[QualityRequest]:
        if isinstance(payload, InferRequest):
            return _requests_from_v2(payload)
        return parse_instances(instances_from_v1(payload), QualityRequest, MAX_INSTANCES)

    def model_inputs(self, requests: list[QualityRequest]) -> list[dict[str, Any]]:
        # Whom a text is for does not change its score: one cache entry per text and kind.
        return [r.model_dump(mode="json", include={"text", "kind"}) for r in requests]

    def answered(
        self,
        payload: dict | InferRequest,
        requests: list[QualityRequest],
        answers: list[dict[str, Any]],
    ) -> None:
        """A V1 or V2 call's `review` answers for a named video go to the review queue."""
        source = Source.V2 if isinstance(payload, InferRequest) else Source.V1
        for request, answer in zip(requests, answers, strict=True):
            if request.video_id is not None:
                self.queue_review(request, answer, source)

    def queue_review(
        self,
        request: QualityRequest,
        answer: dict[str, Any],
        source: Source,
        channel: str | None = None,
    ) -> str | None:
        """Queue `request`'s text for a person when `answer` is `review`; its item id, or None
        (not a review, or the queue could not be written: logged and counted, the answer
        stands). `channel` is the one the request does not name itself (a batch job's)."""
        try:
            item = self.reviews.add_prediction(
                request.text, answer, source, request.channel or channel, request.video_id
            )
        except Exception as e:  # the answer is still right: the caller gets it
            REVIEW_FAILURES.inc()
            logger.error("a review item could not be queued: %s", e, exc_info=e)
            return None
        return None if item is None else item.item_id

    def infer(self, state: QualityVersion, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            probabilities = state.classifier.probabilities([i["text"] for i in inputs])
            classes = state.classifier.calibration.classes(probabilities)
            return [
                decide(p, c, state.policy.check(i["text"], TextKind(i["kind"]))).to_dict()
                for i, p, c in zip(inputs, probabilities, classes, strict=True)
            ]
        except Exception as e:
            raise InferenceError(f"quality scoring failed: {e}") from e

    def v2_outputs(self, answers: list[dict[str, Any]]) -> list[InferOutput]:
        return _v2_outputs(answers)


V2_INPUTS = ("text", "kind", "channel", "video_id")
"""The V2 inputs, `text` first: the others take one value for every text, or one per text."""


def _requests_from_v2(request: InferRequest) -> list[QualityRequest]:
    """V2 inputs: `text` (BYTES [n]) and optional `kind`, `channel` and `video_id` (BYTES [1]
    or [n])."""
    columns: dict[str, list[str]] = {}
    for tensor in request.inputs:
        if tensor.name not in V2_INPUTS:
            raise InvalidInput(f"unknown input {tensor.name!r}; expected {', '.join(V2_INPUTS)}")
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {tensor.name!r} must be BYTES, not {tensor.datatype}")
        try:
            values = tensor.as_numpy().reshape(-1)
            columns[tensor.name] = [
                v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values
            ]
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidInput(f"input {tensor.name!r} cannot be decoded: {e}") from e
    if "text" not in columns:
        raise InvalidInput("input 'text' is required")
    rows = len(columns["text"])
    for name in V2_INPUTS[1:]:
        if len(columns.get(name, [])) == 1:
            columns[name] = columns[name] * rows
        if len(columns.get(name, columns["text"])) != rows:
            raise InvalidInput(f"input {name!r} must have one value or one per text")
    return parse_instances(
        [{name: values[i] for name, values in columns.items()} for i in range(rows)],
        QualityRequest,
        MAX_INSTANCES,
    )


def _v2_outputs(verdicts: list[dict[str, Any]]) -> list[InferOutput]:
    rows = len(verdicts)
    outputs = [
        InferOutput(
            name="score", shape=[rows], datatype="FP64", data=[v["score"] for v in verdicts]
        ),
        InferOutput(
            name="decision", shape=[rows], datatype="BYTES", data=[v["decision"] for v in verdicts]
        ),
        InferOutput(
            name="class", shape=[rows], datatype="INT64", data=[v["class"] for v in verdicts]
        ),
        InferOutput(
            name="probabilities",
            shape=[rows, len(verdicts[0]["labels"])],
            datatype="FP64",
            data=np.asarray([list(v["labels"].values()) for v in verdicts]),
        ),
        InferOutput(
            name="reasons",
            shape=[rows],
            datatype="BYTES",
            data=[json.dumps(v["reasons"]) for v in verdicts],
        ),
    ]
    return outputs
