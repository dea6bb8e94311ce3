"""The `script` model served OpenAI-compatible: `/openai/v1/completions`,
`/openai/v1/chat/completions` (both with `stream`) and `/openai/v1/models`, on the same KServe
ModelServer as the other predictors.

KServe 0.21 has an OpenAI layer (`kserve.protocol.rest.openai`), but its request and response
types are vLLM's: it imports only with `kserve[llm]`, which pins vllm 0.24 and with it
torch 2.11, against our torch 2.13. KServe registers those routes only when that import works,
so it stays out of the way and this module serves the same paths with its own pydantic types,
following OpenAI's API: the same request fields, response bodies, server-sent events
(`data: {chunk}` lines, then `data: [DONE]`) and error bodies (`{"error": {"message", "type",
"param", "code"}}`).

What the server does with a request, beyond OpenAI's documentation:
- `max_tokens` (chat: also `max_completion_tokens`) above `CONTENTML_SCRIPT_MAX_TOKENS` is
  clipped to it, not refused; unset, completions generate 16 tokens (OpenAI's default) and chat
  up to the cap. The model's context clips it further; a prompt that fills the context is a 400.
- A generation longer than `CONTENTML_SCRIPT_TIMEOUT_SECONDS` ends with the text so far and
  `finish_reason: "length"`. A request may say how long its caller waits in the
  `X-Contentml-Timeout-Seconds` header (the strategist does): the limit is then cut to that, less
  `ANSWER_MARGIN_SECONDS`, so the text so far reaches the caller before it gives up. A value
  that is not a finite positive number is a 400 naming the header.
- `n` must be 1; `echo`, `logprobs`, `suffix` and `tools` are refused; other OpenAI fields
  (`user`, penalties, ...) are accepted and have no effect.
- One generation runs at a time per process (the model uses every core; scale with replicas);
  `seed` then makes a sampled answer reproducible.
- `system_fingerprint` names the registered version that answered (`script-v3`).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Literal, TypeVar

import pydantic
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from kserve.errors import InferenceError, InvalidInput
from kserve.model import BaseKServeModel
from transformers import TextStreamer

from contentml.protocol import OPENAI_ROUTE_PREFIX, TIMEOUT_HEADER
from serving.model_server.versions import VersionedModel, load_pyfunc
from training.llm.package import (
    FinishReason,
    Generation,
    PromptTooLong,
    Sampling,
    ScriptGenerator,
    cut_at_stop,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for `/completions` when the request sets no `max_tokens`."""

MAX_STOP_SEQUENCES = 4
"""OpenAI's limit on `stop` sequences per request."""

ANSWER_MARGIN_SECONDS = 0.5
"""Taken off the caller's `TIMEOUT_HEADER` for the generation's time limit (at most half of it):
time for the answer to be written, sent and read before the caller gives up."""


# --- requests ------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the model cannot answer as asked: HTTP 400 naming the field. (Not a
    `ValueError`, which pydantic would fold into a `ValidationError` without the field.)"""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def caller_timeout(value: str | None) -> float | None:
    """Seconds the caller waits for the answer, from its `TIMEOUT_HEADER` value; None when it
    sent none."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError as e:
        raise RequestError(
            f"{TIMEOUT_HEADER} must be a number of seconds, not {value!r}", TIMEOUT_HEADER
        ) from e
    if not (math.isfinite(seconds) and seconds > 0):
        raise RequestError(
            f"{TIMEOUT_HEADER} must be a finite number of seconds above 0, not {value!r}",
            TIMEOUT_HEADER,
        )
    return seconds


def time_limit(configured_seconds: float, caller_seconds: float | None) -> float:
    """Seconds a generation may take: the configured limit, cut so that the answer reaches a
    caller that waits `caller_seconds` (less `ANSWER_MARGIN_SECONDS`, or less half of a shorter
    wait, so the limit stays above 0); None: the configured limit."""
    if caller_seconds is None:
        return configured_seconds
    margin = min(ANSWER_MARGIN_SECONDS, caller_seconds / 2)
    return min(configured_seconds, caller_seconds - margin)


class StreamOptions(pydantic.BaseModel):
    include_usage: bool = False


class _GenerationRequest(pydantic.BaseModel):
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


class CompletionRequest(_GenerationRequest):
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


class ChatCompletionRequest(_GenerationRequest):
    unsupported: ClassVar[tuple[str, ...]] = ("logprobs", "tools")

    messages: list[ChatMessage] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """How one endpoint words its answers: the only difference between the two."""

    object: str
    chunk_object: str
    id_prefix: str
    prompt_field: str
    choice: Callable[[str, str | None], dict]
    delta: Callable[[str, str | None], dict]
    opening_delta: dict | None


COMPLETION = _Shape(
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

CHAT = _Shape(
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


def _usage(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def _event(body: dict) -> str:
    """One server-sent event as OpenAI's clients read it."""
    return f"data: {json.dumps(body)}\n\n"


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# --- streaming -----------------------------------------------------------------------------


class _QueueStreamer(TextStreamer):
    """Hands each finished piece of text from the generation thread to the event loop."""

    def __init__(self, tokenizer, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.loop = loop
        self.queue = queue

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, text)


class StopFilter:
    """Streams text but holds back a tail that could be the start of a stop sequence, so a
    stop sequence is never sent, not even its first characters."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that can be sent now."""
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(self.pending + piece, self.stop)
        if self.stopped:
            self.pending = ""
            return text
        split = max(0, len(text) - self.hold)
        self.pending = text[split:]
        return text[:split]

    def flush(self) -> str:
        """What was held back, once the generation has ended."""
        text, self.pending = self.pending, ""
        return text


# --- the predictor -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScriptVersion:
    version: str
    generator: ScriptGenerator


class ScriptModel(VersionedModel[ScriptVersion]):
    """The champion of the `script` model (and its challenger for the canary's share of
    requests), answering OpenAI completions and chat completions."""

    client_errors = (InvalidInput, RequestError)
    train_command = "contentml pipeline run script-finetune --local"

    def load(self) -> bool:
        self.max_tokens = self.settings.script_max_tokens
        self.timeout_seconds = self.settings.script_timeout_seconds
        return super().load()

    def load_version(self, version: str) -> ScriptVersion:
        return ScriptVersion(version, load_pyfunc(self.name, version).unwrap_python_model())

    def predict(self, payload: Any, headers: dict[str, str] | None = None) -> dict:
        raise InvalidInput(
            f"{self.name} answers OpenAI requests: POST {OPENAI_ROUTE_PREFIX}/v1/completions "
            f"or {OPENAI_ROUTE_PREFIX}/v1/chat/completions"
        )

    async def create_completion(
        self, request: CompletionRequest, caller_seconds: float | None = None
    ) -> dict | AsyncIterator[str]:
        """`caller_seconds`: how long the caller waits for the answer (`TIMEOUT_HEADER`);
        None: unknown, the configured limit holds."""
        state = self.pick(request.model_dump_json())
        with self.observe(state.version):
            prompt_ids = state.generator.tokenizer(request.prompt)["input_ids"]
            return await self._create(
                state,
                COMPLETION,
                request,
                prompt_ids,
                COMPLETION_DEFAULT_MAX_TOKENS,
                caller_seconds,
            )

    async def create_chat_completion(
        self, request: ChatCompletionRequest, caller_seconds: float | None = None
    ) -> dict | AsyncIterator[str]:
        """`caller_seconds`: as for `create_completion`."""
        state = self.pick(request.model_dump_json())
        with self.observe(state.version):
            # Role markers or EOS typed inside a message stay text: only the template's are
            # tokens.
            prompt_ids = state.generator.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text} for m in request.messages],
                add_generation_prompt=True,
                sanitize_control_tokens=True,
            )["input_ids"]
            return await self._create(
                state, CHAT, request, prompt_ids, self.max_tokens, caller_seconds
            )

    async def _create(
        self,
        state: ScriptVersion,
        shape: _Shape,
        request: _GenerationRequest,
        prompt_ids: list[int],
        default_max_tokens: int,
        caller_seconds: float | None,
    ) -> dict | AsyncIterator[str]:
        """One generation by `state`'s version; a stream is timed until it starts."""
        generator = state.generator
        try:
            generator.new_token_budget(len(prompt_ids), 1)
        except PromptTooLong as e:
            raise RequestError(str(e), shape.prompt_field) from e
        sampling = Sampling(
            max_tokens=min(request.requested_max_tokens or default_max_tokens, self.max_tokens),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop=request.stop_tuple,
            max_seconds=time_limit(self.timeout_seconds, caller_seconds),
        )
        header = {
            "id": f"{shape.id_prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.name,
            "system_fingerprint": f"{self.name}-v{state.version}",
        }
        if request.stream:
            return self._stream(
                generator, shape, header, prompt_ids, sampling, request.include_usage
            )
        try:
            generation = await asyncio.to_thread(generator.generate, prompt_ids, sampling)
        except Exception as e:
            raise InferenceError(f"generation failed: {e}") from e
        return {
            **header,
            "object": shape.object,
            "choices": [shape.choice(generation.text, generation.finish_reason.value)],
            "usage": _usage(generation),
        }

    async def _stream(
        self,
        generator: ScriptGenerator,
        shape: _Shape,
        header: dict,
        prompt_ids: list[int],
        sampling: Sampling,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        chunk = {**header, "object": shape.chunk_object}
        if include_usage:
            chunk["usage"] = None
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        streamer = _QueueStreamer(generator.tokenizer, asyncio.get_running_loop(), pieces)
        cancel = threading.Event()
        task = asyncio.ensure_future(
            asyncio.to_thread(generator.generate, prompt_ids, sampling, streamer, cancel)
        )
        # Queued after every piece the thread handed over, so it ends the loop below even
        # when generation fails before the streamer's end.
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        held = StopFilter(sampling.stop)
        try:
            if shape.opening_delta is not None:
                yield _event({**chunk, "choices": [shape.opening_delta]})
            while (piece := await pieces.get()) is not None:
                if text := held.push(piece):
                    yield _event({**chunk, "choices": [shape.delta(text, None)]})
            try:
                generation = await task
            except Exception as e:
                yield _event(error_body(f"generation failed: {e}", kind="server_error"))
                return
            if text := held.flush():
                yield _event({**chunk, "choices": [shape.delta(text, None)]})
            finish = FinishReason.STOP if held.stopped else generation.finish_reason
            yield _event({**chunk, "choices": [shape.delta("", finish.value)]})
            if include_usage:
                yield _event({**chunk, "choices": [], "usage": _usage(generation)})
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client went away: stop generating at the next token


# --- routes --------------------------------------------------------------------------------

Req = TypeVar("Req", bound=_GenerationRequest)


def _validation_problem(error: pydantic.ValidationError) -> tuple[str, str | None]:
    """A message naming every bad field, and the first one as OpenAI's `param`."""
    problems = []
    for err in error.errors():
        field = ".".join(str(part) for part in err["loc"]) or "request"
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}")
    first = error.errors()[0]["loc"]
    return "; ".join(problems), str(first[0]) if first else None


def _error(status: HTTPStatus, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content=error_body(message, param, kind))


async def _dispatch(
    served: dict[str, ScriptModel],
    raw: Request,
    request_type: type[Req],
    handle: Callable[[ScriptModel, Req, float | None], Awaitable[dict | AsyncIterator[str]]],
) -> Response:
    try:
        body = await raw.json()
    except ValueError as e:
        return _error(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {e}")
    try:
        caller_seconds = caller_timeout(raw.headers.get(TIMEOUT_HEADER))
        request = request_type.model_validate(body)
    except RequestError as e:
        return _error(HTTPStatus.BAD_REQUEST, str(e), e.param)
    except pydantic.ValidationError as e:
        return _error(HTTPStatus.BAD_REQUEST, *_validation_problem(e))
    model = served.get(request.model)
    if model is None:
        return _error(
            HTTPStatus.NOT_FOUND,
            f"model {request.model!r} is not served here; served: {', '.join(served)}",
            "model",
        )
    if not model.ready:
        return _error(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"model {request.model!r} is not ready: {model.not_ready_reason()}",
            "model",
        )
    try:
        result = await handle(model, request, caller_seconds)
    except RequestError as e:
        return _error(HTTPStatus.BAD_REQUEST, str(e), e.param)
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result)


def openai_router(models: Iterable[BaseKServeModel]) -> APIRouter | None:
    """The OpenAI routes for the `ScriptModel`s among `models`; None when there are none."""
    served = {m.name: m for m in models if isinstance(m, ScriptModel)}
    if not served:
        return None
    started = int(time.time())

    async def completions(raw: Request) -> Response:
        return await _dispatch(served, raw, CompletionRequest, ScriptModel.create_completion)

    async def chat_completions(raw: Request) -> Response:
        return await _dispatch(
            served, raw, ChatCompletionRequest, ScriptModel.create_chat_completion
        )

    async def list_models() -> dict:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": started, "owned_by": "contentml"}
                for name, model in served.items()
                if model.ready
            ],
        }

    router = APIRouter(prefix=OPENAI_ROUTE_PREFIX, tags=["OpenAI"])
    router.add_api_route("/v1/completions", completions, methods=["POST"])
    router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    router.add_api_route("/v1/models", list_models, methods=["GET"])
    return router
