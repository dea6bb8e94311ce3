"""The content gate: the classifier's calibrated probabilities and the policy findings become
one explainable decision per text (the roadmap's QualityGuardian)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from training.data import TOXICITY_CLASSES
from training.quality.policy import Finding, Severity

NEITHER = TOXICITY_CLASSES.index("neither")


class Decision(StrEnum):
    PASS = "pass"
    REVIEW = "review"  # a person decides
    REJECT = "reject"


@dataclass(frozen=True)
class GateThresholds:
    """The roadmap's thresholds on the quality score (the calibrated probability that a text
    is neither hateful nor offensive)."""

    pass_score: float = 0.85
    """Passes at or above this, when nothing else fires."""

    reject_score: float = 0.60
    """Rejected below this, when the classifier is sure."""

    min_confidence: float = 0.80
    """Below this top-class probability the classifier is unsure: a person reviews."""


@dataclass(frozen=True)
class Verdict:
    score: float
    decision: Decision
    predicted_class: int
    confidence: float
    labels: dict[str, float]
    reasons: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "decision": self.decision.value,
            "class": self.predicted_class,
            "confidence": self.confidence,
            "labels": self.labels,
            "reasons": self.reasons,
        }


def decide(
    probabilities: np.ndarray,
    predicted_class: int,
    findings: list[Finding],
    thresholds: GateThresholds = GateThresholds(),
) -> Verdict:
    """One text's verdict: any rejecting reason rejects, any other reason sends the text to a
    person, and a text passes only when no reason fires."""
    score = float(probabilities[NEITHER])
    confidence = float(probabilities.max())
    reasons = [
        {"check": str(f.check), "severity": f.severity.value, "detail": f.detail} for f in findings
    ]
    verdict = _classifier_reason(probabilities, predicted_class, thresholds)
    if verdict is not None:
        reasons.append(verdict)
    if any(r["severity"] == Severity.REJECT.value for r in reasons):
        decision = Decision.REJECT
    elif reasons:
        decision = Decision.REVIEW
    else:
        decision = Decision.PASS
    return Verdict(
        score=score,
        decision=decision,
        predicted_class=int(predicted_class),
        confidence=confidence,
        labels={name: float(p) for name, p in zip(TOXICITY_CLASSES, probabilities, strict=True)},
        reasons=reasons,
    )


def _classifier_reason(
    probabilities: np.ndarray, predicted_class: int, thresholds: GateThresholds
) -> dict[str, str] | None:
    score = float(probabilities[NEITHER])
    confidence = float(probabilities.max())
    top = TOXICITY_CLASSES[int(probabilities.argmax())]
    if confidence < thresholds.min_confidence:
        severity = Severity.REVIEW
        detail = f"unsure: top class {top} at {confidence:.2f} < {thresholds.min_confidence}"
    elif score < thresholds.reject_score:
        severity = Severity.REJECT
        detail = f"{top} at {confidence:.2f}: score {score:.2f} < {thresholds.reject_score}"
    elif predicted_class != NEITHER:
        severity = Severity.REVIEW
        detail = f"possible {TOXICITY_CLASSES[predicted_class]}: score {score:.2f}"
    elif score < thresholds.pass_score:
        severity = Severity.REVIEW
        detail = f"score {score:.2f} below {thresholds.pass_score}"
    else:
        return None
    return {"check": "classifier", "severity": severity.value, "detail": detail}
