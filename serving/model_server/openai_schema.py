"""OpenAI's wire format as the `script` model serves it: the completions and chat completions
request bodies (validated as OpenAI does, refusing what this server does not support), and the
shapes of the answers, their server-sent events and OpenAI's error bodies."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pydantic

from training.llm.generation import Generation

MAX_STOP_SEQUENCES = 4
"""OpenAI's limit on `stop` sequences per request."""


# --- requests ------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the model cannot answer as asked: HTTP 400 naming the field. (Not a
    `ValueError`, which pydantic would fold into a `ValidationError` without the field.)"""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(pydantic.BaseModel):
    include_usage: bool = False


class GenerationRequest(pydantic.BaseModel):
    """The fields the completions and chat completions requests share."""

    model_config = pydantic.ConfigDict(extra="ignore")

    unsupported: ClassVar[tuple[str, ...]] = ()
    """OpenAI fields this server refuses when they are set (others it does not know are
    ignored)."""

    model: str
    max_tokens: int | None = pydantic.Field(None, ge=1)
    temperature: float | None = pydantic.Field(None, ge=0, le=2)
    top_p: float | None = pydantic.Field(None, gt=0, le=1)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = pydantic.Field(None, ge=-(2**63), lt=2**64)  # torch's seed range

    @pydantic.model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in cls.unsupported:
                if data.get(name) not in (None, False):
                    raise RequestError(f"{name} is not supported by this model", name)
        return data

    @pydantic.field_validator("n")
    @classmethod
    def one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported: send one request per answer")
        return n

    @pydantic.field_validator("stop")
    @classmethod
    def stop_sequences(cls, stop: str | list[str] | None) -> str | list[str] | None:
        sequences = [stop] if isinstance(stop, str) else stop or []
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in sequences):
            raise ValueError("stop sequences must not be empty")
        return stop

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def stop_tuple(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    unsupported: ClassVar[tuple[str, ...]] = ("echo", "logprobs", "suffix")

    prompt: str | list[str]

    @pydantic.field_validator("prompt")
    @classmethod
    def one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("send exactly one prompt per request")
            prompt = prompt[0]
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return prompt


class TextPart(pydantic.BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(pydantic.BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    unsupported: ClassVar[tuple[str, ...]] = ("logprobs", "tools")

    messages: list[ChatMessage] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerShape:
    """How one endpoint words its answers: the only difference between the two."""

    object: str
    chunk_object: str
    id_prefix: str
    prompt_field: str
    choice: Callable[[str, str | None], dict]
    delta: Callable[[str, str | None], dict]
    opening_delta: dict | None


COMPLETION = AnswerShape(
    object="text_completion",
    chunk_object="text_completion",
    id_prefix="cmpl",
    prompt_field="prompt",
    choice=lambda text, finish: {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish,
    },
    delta=lambda text, finish: {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish,
    },
    opening_delta=None,
)

CHAT = AnswerShape(
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    id_prefix="chatcmpl",
    prompt_field="messages",
    choice=lambda text, finish: {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish,
    },
    delta=lambda text, finish: {
        "index": 0,
        "delta": {"content": text} if text else {},
        "logprobs": None,
        "finish_reason": finish,
    },
    opening_delta={
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    },
)


def usage_body(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def sse_event(body: dict) -> str:
    """One server-sent event as OpenAI's clients read it."""
    return f"data: {json.dumps(body)}\n\n"


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
