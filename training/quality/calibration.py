"""Turn the members' out-of-fold log-probabilities into probabilities that mean what they say,
and choose the hate-speech threshold.

The stacker is a multinomial logistic regression over the members' log-probabilities (Wolpert
1992, fitted on out-of-fold predictions): it learns how far to trust each member per class and
is calibrated by construction, like the temperature scaling it generalises (Guo et al. 2017).
The class decision is then cost-sensitive: hate speech is called at a lower probability than
the argmax would, because a missed hate tweet costs more than a human review. Every choice
here sees only out-of-fold predictions of the training split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import PredefinedSplit, cross_val_predict

from training.data import TOXICITY_CLASSES

HATE = TOXICITY_CLASSES.index("hate_speech")

THRESHOLD_GRID = np.round(np.arange(0.05, 0.8001, 0.005), 3)
"""Hate thresholds tried: finer steps would fit the out-of-fold noise, not the task."""

STACKER_C = 1.0
"""Inverse L2 strength of the stacker: a few weights on thousands of rows need little."""


@dataclass(frozen=True)
class Calibration:
    """A linear map from member log-probabilities to class scores, softmax, and the hate
    threshold."""

    weights: tuple[tuple[float, ...], ...]
    """[classes, features]: class scores are `features @ weights.T + bias`."""

    bias: tuple[float, ...]
    """Per-class offset of the scores."""

    hate_threshold: float
    """A text is hate speech when its calibrated hate probability reaches this; otherwise the
    likelier of offensive and neither."""

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        scores = features @ np.asarray(self.weights).T + np.asarray(self.bias)
        return softmax(scores, axis=1)

    def classes(self, probabilities: np.ndarray) -> np.ndarray:
        return hate_then_argmax(probabilities, self.hate_threshold)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Calibration:
        return cls(
            weights=tuple(tuple(float(w) for w in row) for row in values["weights"]),
            bias=tuple(float(b) for b in values["bias"]),
            hate_threshold=float(values["hate_threshold"]),
        )

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> Calibration:
        return cls.from_dict(json.loads(Path(path).read_text()))


def hate_then_argmax(probabilities: np.ndarray, hate_threshold: float) -> np.ndarray:
    """Hate speech where its probability reaches the threshold, else the likelier other."""
    others = probabilities.copy()
    others[:, HATE] = -1.0
    return np.where(probabilities[:, HATE] >= hate_threshold, HATE, others.argmax(axis=1))


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
        predicted = hate_then_argmax(probabilities, float(threshold))
        recall, f1 = hate_recall_and_weighted_f1(labels, predicted)
        reaches = recall >= recall_target
        key = (reaches, f1 if reaches else recall, f1 if not reaches else 0.0, float(threshold))
        if best is None or key > best:
            best = key
    return best[3]


def hate_recall_and_weighted_f1(labels: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Hate-speech recall and weighted F1 (sklearn's definitions, zero where undefined) from
    one confusion matrix: the threshold search scores every grid point, and sklearn's
    validated metrics cost it about a second per fit."""
    classes = len(TOXICITY_CLASSES)
    confusion = np.bincount(labels * classes + predicted, minlength=classes * classes)
    confusion = confusion.reshape(classes, classes)
    hits, support, called = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    f1 = np.divide(2 * hits, support + called, out=np.zeros(classes), where=support + called > 0)
    recall = hits[HATE] / support[HATE] if support[HATE] else 0.0
    return float(recall), float(f1 @ support / support.sum())


def fit_stacker(
    features: np.ndarray,
    labels: np.ndarray,
    folds: np.ndarray,
    recall_target: float,
    columns: slice = slice(None),
) -> Calibration:
    """Stack the out-of-fold `features` (only `columns` of them; the others get weight 0) with
    a multinomial logistic regression. The hate threshold is chosen on the stacker's own
    out-of-fold probabilities over the same `folds`, so it is not fitted to rows the stacker
    was fitted on."""
    used = features[:, columns]
    stacker = LogisticRegression(C=STACKER_C, max_iter=1000)
    held_out = cross_val_predict(
        stacker, used, labels, cv=PredefinedSplit(folds), method="predict_proba"
    )
    stacker.fit(used, labels)
    weights = np.zeros((len(TOXICITY_CLASSES), features.shape[1]))
    weights[:, columns] = stacker.coef_
    return Calibration(
        weights=tuple(map(tuple, weights.tolist())),
        bias=tuple(stacker.intercept_.tolist()),
        hate_threshold=fit_hate_threshold(held_out, labels, recall_target),
    )


def fixed_blend(
    features: np.ndarray, labels: np.ndarray, lexical_weight: float, recall_target: float
) -> Calibration:
    """The earlier recipe, kept as an ablation: encoder and lexical log-probabilities (the
    first and second half of `features`) blended `1 - lexical_weight` / `lexical_weight`,
    temperature-scaled, with a hate threshold, all fitted on the same out-of-fold rows."""
    classes = len(TOXICITY_CLASSES)
    blend = np.hstack([(1 - lexical_weight) * np.eye(classes), lexical_weight * np.eye(classes)])
    temperature = fit_temperature(features @ blend.T, labels)
    weights = blend / temperature
    probabilities = softmax(features @ weights.T, axis=1)
    return Calibration(
        weights=tuple(map(tuple, weights.tolist())),
        bias=(0.0,) * classes,
        hate_threshold=fit_hate_threshold(probabilities, labels, recall_target),
    )


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
