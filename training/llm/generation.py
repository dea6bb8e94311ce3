"""What a script generation is asked for and what it returns: the vocabulary the generator
(`training/llm/package.py`) and the OpenAI-compatible server share. Plain Python, so the
server's routes import it without torch."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FinishReason(StrEnum):
    """Why a generation ended, in OpenAI's words."""

    STOP = "stop"  # EOS or a stop sequence
    LENGTH = "length"  # max tokens, the model's context or the wall-clock limit


class PromptTooLong(ValueError):
    """The prompt leaves no room in the model's context for a single new token."""


MIN_SAMPLING_TEMPERATURE = 1e-6
"""Temperatures below this decode greedily, as sampling at them would but for near-ties: at a
tiny one the logits divided by it overflow float32 (or it rounds to 0 there) and sampling
fails."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    """Most tokens to generate (fewer when the model's context ends first)."""

    temperature: float = 0.0
    """0 is greedy decoding (and below `MIN_SAMPLING_TEMPERATURE`); above, sampling at this
    temperature."""

    top_p: float = 1.0
    """Nucleus sampling mass (only when sampling)."""

    seed: int | None = None
    """Seeds torch's generator before sampling, for a reproducible answer."""

    stop: tuple[str, ...] = ()
    """Texts that end the generation; the returned text stops before the first one."""

    max_seconds: float | None = None
    """Wall-clock limit from the call, waiting for the generation before it included; reaching
    it ends with `FinishReason.LENGTH` (after at least one token)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, not {self.max_seconds}")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must not be empty")


@dataclass(frozen=True)
class Generation:
    text: str
    """The continuation, special tokens removed, cut before the first stop sequence."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop sequence, and whether one occurs."""
    positions = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(positions)], True) if positions else (text, False)
