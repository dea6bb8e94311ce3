"""LoRA fine-tuning of the script model with Lightning's DeepSpeed strategy (ZeRO-2/3), then
merge, export, register as `script` and gate on validation bits per byte.

The same `finetune` runs on two CPU cores (gloo, one process) and in a TrainJob of 2 x 8 GPUs
(NCCL): the recipe says which. Every rank trains; rank 0 exports and talks to MLflow.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import deepspeed.ops
import mlflow
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import reset_seed
from peft import PeftModel
from pytorch_lightning.strategies import DeepSpeedStrategy
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from contentml import registry
from contentml.settings import Settings
from training.llm import data, model
from training.llm.config import FinetuneConfig
from training.llm.package import log_script_model

MODEL_NAME = "script"
RECIPE_ARTIFACT = "recipe.yaml"
"""The run's recipe (`FinetuneConfig` fields), logged next to the model."""
GATE_METRIC = "bits_per_byte"
"""Validation loss per UTF-8 byte of the responses: lower is better, and unlike loss per
token it compares models with different tokenizers."""

SHM_COMM_OP = "deepspeed_shm_comm"


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy without its CUDA-only guard: DeepSpeed's own CPU
    accelerator runs ZeRO on gloo, so the GPU recipe's code path is testable on a laptop."""

    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's CUDA check; DDPStrategy's setup is what remains.
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        # The parent validates CUDA device indices, which CPU devices do not have.
        reset_seed()
        self.set_world_ranks()
        # On the CPU accelerator DeepSpeed's comm JIT-compiles its shared-memory op (30 s of
        # g++ on 2 cores, per fresh machine) for `inference_all_reduce` alone; training
        # reduces through gloo, so the op is marked unavailable and never built.
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed's engine reads the device index as this process's rank.
        return torch.device("cpu", self.local_rank)


def strategy(config: FinetuneConfig) -> DeepSpeedStrategy:
    """ZeRO of the recipe's stage, with its offloads; gloo on CPU, NCCL on GPUs."""
    kind = CPUDeepSpeedStrategy if config.accelerator == "cpu" else DeepSpeedStrategy
    return kind(
        stage=config.zero_stage,
        offload_optimizer=config.offload_optimizer,
        offload_parameters=config.offload_parameters,
        process_group_backend="gloo" if config.accelerator == "cpu" else "nccl",
        logging_batch_size_per_gpu=config.micro_batch_size,
    )


class LoRAFinetune(pl.LightningModule):
    def __init__(self, peft_model: PeftModel, config: FinetuneConfig):
        super().__init__()
        self.model = peft_model
        self.config = config
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, labels = batch
        loss = self.model(input_ids=input_ids, labels=labels).loss
        self.log("train_loss", loss, prog_bar=True)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        input_ids, labels = batch
        self.log("val_loss", self.model(input_ids=input_ids, labels=labels).loss, sync_dist=True)

    def configure_optimizers(self) -> dict:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.config.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of the peak."""
        warmup, total = self.config.warmup_steps, self.config.max_steps
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def bits_per_byte(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[data.Example]
) -> float:
    """Summed response loss over `examples` in bits, per UTF-8 byte of the responses."""
    lm.eval()
    nats = 0.0
    with torch.inference_mode():
        for example in examples:
            ids, labels = data.encode(tokenizer, example)
            input_ids = torch.tensor([ids], device=lm.device)
            logits = lm(input_ids=input_ids).logits[0, :-1].float()
            targets = torch.tensor(labels[1:], device=lm.device)
            nats += torch.nn.functional.cross_entropy(
                logits, targets, ignore_index=data.IGNORE_INDEX, reduction="sum"
            ).item()
    return nats / math.log(2) / data.response_bytes(examples)


def finetune(settings: Settings, config: FinetuneConfig) -> dict | None:
    """Train, and on rank 0 export, register and gate; returns rank 0's summary (None on the
    other ranks)."""
    train, validation = data.recipe_examples(settings.data_dir, config)
    corpus = [m["content"] for e in train for m in e.messages] + [e.response for e in train]
    tokenizer = model.load_tokenizer(config, corpus)
    peft_model = model.add_lora(model.load_base(config, tokenizer), config)

    module = LoRAFinetune(peft_model, config)
    trainer = pl.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=strategy(config),
        precision=config.precision,
        max_steps=config.max_steps,
        accumulate_grad_batches=config.gradient_accumulation,
        val_check_interval=config.eval_every * config.gradient_accumulation,
        check_val_every_n_epoch=None,
        limit_val_batches=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with _rank_variables_scope():
        started = time.monotonic()
        trainer.fit(
            module,
            _loader(tokenizer, train, config, shuffle=True),
            _loader(tokenizer, validation, config, shuffle=False),
        )
        train_seconds = time.monotonic() - started
        with _gathered(peft_model, config):
            if not trainer.is_global_zero:
                return None
            return _export(settings, config, module, tokenizer, validation, train_seconds)


RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")
"""What Lightning's DeepSpeed strategy writes into `os.environ` for the ranks it starts."""


@contextlib.contextmanager
def _rank_variables_scope() -> Iterator[None]:
    """Put the rank variables back after training: left in `os.environ`, a child process
    (the CLI run from a notebook or a test) reads `LOCAL_RANK` as "started by a launcher" and
    never starts its other ranks. The process group stays: DeepSpeed keeps references to it,
    and a second run in this process reuses it."""
    before = {name: os.environ.get(name) for name in RANK_VARIABLES}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _loader(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[data.Example],
    config: FinetuneConfig,
    shuffle: bool,
) -> DataLoader:
    packed = data.pack(tokenizer, examples, config.seq_len)
    dataset = TensorDataset(packed["input_ids"], packed["labels"])
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(dataset, config.micro_batch_size, shuffle=shuffle, generator=generator)


def _gathered(peft_model: PeftModel, config: FinetuneConfig):
    """ZeRO-3 keeps a shard of each parameter per rank: gather them (on every rank) before
    rank 0 merges and saves. ZeRO-2 keeps full parameters everywhere."""
    if config.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(peft_model.parameters()), modifier_rank=None)


def _export(
    settings: Settings,
    config: FinetuneConfig,
    module: LoRAFinetune,
    tokenizer: PreTrainedTokenizerBase,
    validation: list[data.Example],
    train_seconds: float,
) -> dict:
    """Save the adapters, merge them into a plain transformers model, log both, register the
    model as `script` (challenger) and gate it on validation bits per byte."""
    client = registry.connect(settings)
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    losses = module.losses
    window = max(1, min(10, len(losses) // 4))
    tokens = config.max_steps * config.gradient_accumulation * config.micro_batch_size
    tokens *= config.seq_len * config.world_size
    with (
        tempfile.TemporaryDirectory() as scratch,
        mlflow.start_run(
            experiment_id=registry.experiment_id(client, settings), run_name="script-lora"
        ),
    ):
        adapter_dir, model_dir = Path(scratch) / "adapter", Path(scratch) / "model"
        module.model.save_pretrained(adapter_dir)
        merged = module.model.merge_and_unload().float().cpu()
        merged.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        score = bits_per_byte(merged, tokenizer, validation)
        metrics = {
            "train_loss_first": sum(losses[:window]) / window,
            "train_loss_last": sum(losses[-window:]) / window,
            GATE_METRIC: score,
            "train_seconds": train_seconds,
            "tokens_per_second": tokens / train_seconds,
        }
        mlflow.log_params(config.to_dict())
        # The recipe as a file its loader reads back: `llm evaluate` takes the run's held-out
        # videos from it.
        mlflow.log_dict(config.to_dict(), RECIPE_ARTIFACT)
        mlflow.log_metrics(metrics)
        for step, loss in enumerate(losses):
            mlflow.log_metric("train_loss", loss, step=step)
        mlflow.log_artifacts(str(adapter_dir), "adapter")
        info = log_script_model(model_dir, MODEL_NAME)
    version = str(info.registered_model_version)
    registry.register_challenger(client, MODEL_NAME, version, "lora fine-tuning")
    gate = registry.promotion_gate(
        client,
        MODEL_NAME,
        version,
        metric=GATE_METRIC,
        greater_is_better=False,
        challenger_score=score,
        score_champion=lambda uri: _score_registered(uri, validation),
    )
    return {
        "model": MODEL_NAME,
        "version": version,
        "promoted": gate.promoted,
        "validation_examples": len(validation),
        **{name: round(value, 4) for name, value in metrics.items()},
        "trainable_parameters": trainable,
    }


def _score_registered(uri: str, validation: list[data.Example]) -> float:
    script = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    return bits_per_byte(script.model, script.tokenizer, validation)
