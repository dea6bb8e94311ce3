"""Make the classifier's probabilities mean what they say, and choose the hate-speech threshold.

Temperature scaling (Guo et al. 2017) divides the logits by one number fitted on the
validation split: it fixes over-confidence without changing which class ranks first. The
class decision is then cost-sensitive: hate speech is called at a lower probability than the
argmax would, because a missed hate tweet costs more than a human review.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import f1_score, recall_score

from training.data import TOXICITY_CLASSES

HATE = TOXICITY_CLASSES.index("hate_speech")

THRESHOLD_GRID = np.round(np.arange(0.05, 0.5001, 0.005), 3)
"""Hate thresholds tried: finer steps would fit the validation split's noise, not the task."""


@dataclass(frozen=True)
class Calibration:
    temperature: float
    """Logits are divided by this before the softmax."""

    hate_threshold: float
    """A text is hate speech when its calibrated hate probability reaches this; otherwise the
    likelier of offensive and neither."""

    lexical_weight: float = 0.0
    """Share of the lexical model in the scores calibrated (see `lexical.blend`)."""

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits / self.temperature, axis=1)

    def classes(self, probabilities: np.ndarray) -> np.ndarray:
        others = probabilities.copy()
        others[:, HATE] = -1.0
        return np.where(probabilities[:, HATE] >= self.hate_threshold, HATE, others.argmax(axis=1))

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> Calibration:
        return cls(**json.loads(Path(path).read_text()))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of the labels."""

    def nll(temperature: float) -> float:
        return -log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean()

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def fit_hate_threshold(
    probabilities: np.ndarray, labels: np.ndarray, recall_target: float
) -> float:
    """The threshold with the best weighted F1 among those whose hate recall reaches the
    target; if none does, the one with the highest recall (then the best F1)."""
    best: tuple[bool, float, float, float] | None = None
    for threshold in THRESHOLD_GRID:
        predicted = Calibration(1.0, float(threshold)).classes(probabilities)
        recall = recall_score(labels == HATE, predicted == HATE, zero_division=0.0)
        f1 = f1_score(labels, predicted, average="weighted")
        reaches = recall >= recall_target
        key = (reaches, f1 if reaches else recall, f1 if not reaches else 0.0, float(threshold))
        if best is None or key > best:
            best = key
    return best[3]


def calibrate(
    logits: np.ndarray, labels: np.ndarray, recall_target: float, lexical_weight: float = 0.0
) -> Calibration:
    temperature = fit_temperature(logits, labels)
    probabilities = softmax(logits / temperature, axis=1)
    threshold = fit_hate_threshold(probabilities, labels, recall_target)
    return Calibration(temperature, threshold, lexical_weight)


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 10
) -> float:
    """How far confidence (the top probability) is from accuracy, averaged over equal-width
    confidence bins weighted by their size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)
