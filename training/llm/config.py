"""The script model's fine-tuning recipe, as data: one YAML file per setup in `configs/`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from contentml.recipes import ConfigError, check_field_types, load_recipe

CONFIGS = Path(__file__).with_name("configs")

BUILT_FROM_CONFIG = "config"
"""`base_model` value: a Llama-architecture model built from the shape fields, randomly
initialised (no weights can be downloaded here)."""

TRAINED_HERE = "train"
"""`tokenizer` value: a byte-level BPE trained on the fine-tuning corpus."""


class Launcher(StrEnum):
    """Where the KFP component runs the recipe."""

    LOCAL = "local"  # in the component's own process
    TRAINJOB = "trainjob"  # a Kubeflow Trainer TrainJob of `num_nodes` x `devices`


@dataclass(frozen=True)
class FinetuneConfig:
    base_model: str = BUILT_FROM_CONFIG
    """`config`, a local folder or a Hugging Face hub id (hub ids need `HF_HUB_OFFLINE`
    unset and a network)."""

    tokenizer: str = TRAINED_HERE
    """`train`, or a folder / hub id; empty means the base model's own tokenizer."""

    vocab_size: int = 4096
    """BPE vocabulary when the tokenizer is trained here."""

    hidden_size: int = 128
    """Model width, for a model built from the config."""

    intermediate_size: int = 352
    """MLP width (SwiGLU), for a model built from the config."""

    num_layers: int = 4
    """Decoder layers, for a model built from the config."""

    num_heads: int = 4
    """Attention heads, for a model built from the config."""

    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention), for a model built from the config."""

    seq_len: int = 256
    """Tokens per packed training sequence; examples are concatenated up to it."""

    lora_r: int = 16
    """LoRA rank."""

    lora_alpha: int = 32
    """LoRA scale numerator (the update is scaled by alpha / r)."""

    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""

    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Linear layers that get LoRA adapters."""

    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapters: the embeddings and output layer when the
    vocabulary is new (`embed_tokens`, `lm_head`)."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 2 partitions optimiser state and gradients, 3 also parameters."""

    offload_optimizer: bool = False
    """Keep the optimiser state in CPU memory (ZeRO-Offload)."""

    offload_parameters: bool = False
    """Keep the parameters in CPU memory (ZeRO-3 only)."""

    precision: str = "32-true"
    """Lightning precision: `32-true` on CPU, `bf16-mixed` / `bf16-true` on GPUs."""

    accelerator: str = "cpu"
    """`cpu` (gloo) or `gpu` (NCCL)."""

    devices: int = 1
    """Processes per node (GPUs per node on `gpu`)."""

    num_nodes: int = 1
    """Nodes; more than one runs as a TrainJob in the cluster."""

    launcher: Launcher = Launcher.LOCAL
    """How the KFP component runs it (`local` or `trainjob`)."""

    micro_batch_size: int = 8
    """Packed sequences per process per step."""

    gradient_accumulation: int = 1
    """Micro-batches per optimiser step."""

    learning_rate: float = 1e-3
    """Peak AdamW learning rate, after a linear warm-up, cosine-decayed to a tenth."""

    warmup_steps: int = 20
    """Optimiser steps of linear warm-up."""

    max_steps: int = 200
    """Optimiser steps in all."""

    eval_every: int = 50
    """Optimiser steps between validation passes."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, a third more compute."""

    max_examples: int | None = None
    """Use at most this many instruction pairs (smoke tests)."""

    validation_fraction: float = 0.05
    """Share of the videos (by a stable hash of the id) whose examples are held out."""

    seed: int = 0
    """Seed for weight init, shuffling and dropout."""

    def __post_init__(self) -> None:
        if isinstance(self.launcher, str) and not isinstance(self.launcher, Launcher):
            try:
                object.__setattr__(self, "launcher", Launcher(self.launcher))
            except ValueError as e:
                choices = [launcher.value for launcher in Launcher]
                raise ConfigError(
                    f"launcher must be one of {choices}, not {self.launcher!r}"
                ) from e
        check_field_types(self)
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "seq_len", "lora_r", "lora_alpha", "devices", "num_nodes",
            "micro_batch_size", "gradient_accumulation", "max_steps", "eval_every",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "hidden_size must be a multiple of num_heads, and num_heads of num_kv_heads "
                f"(got {self.hidden_size}, {self.num_heads}, {self.num_kv_heads})"
            )
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"zero_stage must be 2 or 3, not {self.zero_stage}")
        if self.offload_parameters and self.zero_stage != 3:
            raise ConfigError("offload_parameters needs zero_stage 3")
        if self.accelerator not in ("cpu", "gpu"):
            raise ConfigError(f"accelerator must be 'cpu' or 'gpu', not {self.accelerator!r}")
        if self.accelerator == "cpu" and self.precision != "32-true":
            raise ConfigError(f"precision on cpu must be '32-true', not {self.precision!r}")
        if self.precision not in ("32-true", "bf16-mixed", "bf16-true"):
            raise ConfigError(
                f"precision must be 32-true, bf16-mixed or bf16-true, not {self.precision!r}"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, not {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(
                f"validation_fraction must be in (0, 1), not {self.validation_fraction}"
            )
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            raise ConfigError(f"warmup_steps must be in [0, max_steps), not {self.warmup_steps}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"max_examples must be at least 1, not {self.max_examples}")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"launcher": self.launcher.value}


def load_config(path: Path | None = None, **overrides) -> FinetuneConfig:
    """The recipe from a YAML file of `FinetuneConfig` fields (defaults for the rest), with
    `overrides` (those not None) on top."""
    return load_recipe(FinetuneConfig, path, **overrides)
