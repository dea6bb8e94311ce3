"""A lexical classifier beside the encoder: TF-IDF word and character n-grams into a logistic
regression, the model family of Davidson et al. Slurs and their spellings are lexical, and
MiniLM's word pieces blur them; stacking the two separates hate speech from merely offensive
language better than either alone (`contentml quality evaluate` measures it)."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline, make_union

from training.quality.classifier import normalize


def fit_lexical(texts: list[str], labels: np.ndarray, c: float) -> Pipeline:
    """Word 1-3-grams and within-word character 2-5-grams, classes balanced by weight."""
    features = make_union(
        TfidfVectorizer(
            preprocessor=_lexical_text, ngram_range=(1, 3), min_df=2, sublinear_tf=True
        ),
        TfidfVectorizer(
            preprocessor=_lexical_text,
            analyzer="char_wb",
            ngram_range=(2, 5),
            min_df=3,
            sublinear_tf=True,
        ),
    )
    model = make_pipeline(features, LogisticRegression(C=c, max_iter=3000, class_weight="balanced"))
    return model.fit(texts, labels)


def _lexical_text(text: str) -> str:
    # A named function, not a lambda, so that the fitted pipeline pickles.
    return normalize(text).lower()


def log_probabilities(model: Pipeline, texts: list[str]) -> np.ndarray:
    # Floor at e^-20: a zero probability would make the stacker's features -inf.
    return np.log(np.clip(model.predict_proba(texts), 2e-9, None))


def save_lexical(models: list[Pipeline], path: Path) -> Path:
    joblib.dump(models, path)
    return path


def load_lexical(path: Path) -> list[Pipeline]:
    return joblib.load(path)
