"""KServe predictor for the content gate (`/v1/models/quality:predict`, V2 `infer`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydantic
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest

from serving.model_server.payloads import instances_from_v1, parse_instances
from serving.model_server.versions import CachedPredictor, load_pyfunc
from training.data import load_texts
from training.quality.gate import decide
from training.quality.policy import PolicyChecker, TextKind, load_policy

MAX_TEXT_CHARS = 20_000
"""Longer texts are refused: a script is well under this, and the cost grows with length."""

MAX_INSTANCES = 256
"""A larger batch belongs in a batch job (`contentml quality predict`), not a call."""


class QualityRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    text: pydantic.StrictStr = pydantic.Field(max_length=MAX_TEXT_CHARS)
    kind: TextKind = TextKind.SCRIPT

    @pydantic.field_validator("text")
    @classmethod
    def not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("text is empty")
        return text


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
        return super().load()

    def load_version(self, version: str) -> QualityVersion:
        classifier = load_pyfunc(self.name, version).unwrap_python_model()
        policy = PolicyChecker(load_policy(classifier.policy_path), self.published)
        return QualityVersion(version, classifier, policy)

    def parse(self, payload: dict | InferRequest) -> list[QualityRequest]:
        if isinstance(payload, InferRequest):
            return _requests_from_v2(payload)
        return parse_instances(instances_from_v1(payload), QualityRequest, MAX_INSTANCES)

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


def _requests_from_v2(request: InferRequest) -> list[QualityRequest]:
    """V2 inputs: `text` (BYTES [n]) and optional `kind` (BYTES [1] or [n])."""
    columns: dict[str, list[str]] = {}
    for tensor in request.inputs:
        if tensor.name not in ("text", "kind"):
            raise InvalidInput(f"unknown input {tensor.name!r}; expected text and kind")
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
    if len(columns.get("kind", [])) == 1:
        columns["kind"] = columns["kind"] * rows
    if len(columns.get("kind", columns["text"])) != rows:
        raise InvalidInput("input 'kind' must have one value or one per text")
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
