"""Cross-fitting: the encoder and the lexical model are each trained once per fold of the
training split, on the other folds, and predict the fold they did not see. Those out-of-fold
log-probabilities are what the stacker and the hate threshold are fitted on
(`calibration.fit_stacker`); the served model averages the fold models' log-probabilities,
the same features from models that saw as much data as the ones that made them."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import log_softmax
from sklearn.pipeline import Pipeline
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from contentml.runtime import one_native_thread
from training.data import TOXICITY_CLASSES
from training.quality import classifier, lexical
from training.quality.config import QualityConfig

ENCODER_COLUMNS = slice(0, len(TOXICITY_CLASSES))
"""Feature columns holding the encoder's log-probabilities."""

LEXICAL_COLUMNS = slice(len(TOXICITY_CLASSES), 2 * len(TOXICITY_CLASSES))
"""Feature columns holding the lexical model's log-probabilities."""


FOLD_THREADS = ThreadPoolExecutor(thread_name_prefix="fold-encoder", initializer=one_native_thread)
"""Where the served model's fold encoders run side by side, one native thread each. A
predictor answers on one native thread (`serving.model_server.versions.PREDICT_THREADS`), one
model call at a time, so the encoders otherwise took turns on one core: side by side they
answered 64 texts in 0.55 of the time and one text in 0.7-0.8 of it on 2 cores."""


@dataclass
class Members:
    """One encoder and one lexical model per fold."""

    encoders: list[tuple[PreTrainedModel, PreTrainedTokenizerBase]]
    lexical: list[Pipeline]

    def features(self, texts: list[str]) -> np.ndarray:
        """[texts, 6]: the encoders' log-probabilities, then the lexical models', each averaged
        over the folds. Several encoders run side by side on `FOLD_THREADS`."""

        def encode(fitted: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> np.ndarray:
            return log_softmax(classifier.predict_logits(*fitted, texts), axis=1)

        if len(self.encoders) == 1:  # a fold's own predictions in training: torch's threads
            encoder = [encode(self.encoders[0])]
        else:
            encoder = list(FOLD_THREADS.map(encode, self.encoders))
        words = [lexical.log_probabilities(model, texts) for model in self.lexical]
        return np.hstack([np.mean(encoder, axis=0), np.mean(words, axis=0)])

    def save(self, encoders: Path, lexical_path: Path) -> tuple[Path, Path]:
        """Encoders in `encoders/fold_<k>` (each loadable by Hugging Face on its own), the
        lexical models in one joblib file."""
        for fold, (model, tokenizer) in enumerate(self.encoders):
            classifier.save_fitted(model, tokenizer, encoders / f"fold_{fold}")
        return encoders, lexical.save_lexical(self.lexical, lexical_path)

    @classmethod
    def load(cls, encoders: Path, lexical_path: Path) -> Members:
        folders = sorted(encoders.glob("fold_*"), key=lambda p: int(p.name.removeprefix("fold_")))
        if not folders:
            raise FileNotFoundError(f"{encoders} has no fold_<k> encoder folders")
        return cls([classifier.load_fitted(f) for f in folders], lexical.load_lexical(lexical_path))


def cross_fit(
    training: pd.DataFrame, folds: np.ndarray, config: QualityConfig
) -> tuple[Members, np.ndarray, list[list[dict[str, float]]]]:
    """Fit the members on every fold but one, `config.folds` times. Returns the fold models,
    the out-of-fold features of every training row, and each fold encoder's epoch history
    (its epoch is chosen on the fold it leaves out)."""
    fitted = Members([], [])
    out_of_fold = np.zeros((len(training), 2 * len(TOXICITY_CLASSES)))
    histories = []
    for fold in range(config.folds):
        held_out = folds == fold
        seen, unseen = training[~held_out], training[held_out]
        print(
            f"[quality] fold {fold + 1}/{config.folds}: {len(seen)} rows, {len(unseen)} held out",
            file=sys.stderr,
            flush=True,
        )
        model, tokenizer, history = classifier.fit(seen, unseen, config)
        words = lexical.fit_lexical(
            seen["text"].tolist(), seen["label"].to_numpy(), config.lexical_c
        )
        member = Members([(model, tokenizer)], [words])
        out_of_fold[held_out] = member.features(unseen["text"].tolist())
        fitted.encoders.append((model, tokenizer))
        fitted.lexical.append(words)
        histories.append(history)
    return fitted, out_of_fold, histories
