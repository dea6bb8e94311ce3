"""The `script` model's predictor: the champion of the `script` model (and its challenger for
the canary's share) generating OpenAI completions and chat completions, whole or streamed.
The routes that call it are `openai_routes`, the bodies they parse `openai_schema`.

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
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kserve.errors import InferenceError, InvalidInput

from contentml.protocol import OPENAI_ROUTE_PREFIX
from serving.model_server.openai_schema import (
    CHAT,
    COMPLETION,
    AnswerShape,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    RequestError,
    error_body,
    sse_event,
    usage_body,
)
from serving.model_server.versions import VersionedModel, load_pyfunc
from training.llm.generation import FinishReason, PromptTooLong, Sampling, cut_at_stop

if TYPE_CHECKING:
    # The generator is what the pyfunc loads; importing its module here would load torch in
    # every server, also those that serve no script model.
    from training.llm.package import ScriptGenerator

COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for `/completions` when the request sets no `max_tokens`."""

ANSWER_MARGIN_SECONDS = 0.5
"""Taken off the caller's `TIMEOUT_HEADER` for the generation's time limit (at most half of it):
time for the answer to be written, sent and read before the caller gives up."""


def time_limit(configured_seconds: float, caller_seconds: float | None) -> float:
    """Seconds a generation may take: the configured limit, cut so that the answer reaches a
    caller that waits `caller_seconds` (less `ANSWER_MARGIN_SECONDS`, or less half of a shorter
    wait, so the limit stays above 0); None: the configured limit."""
    if caller_seconds is None:
        return configured_seconds
    margin = min(ANSWER_MARGIN_SECONDS, caller_seconds / 2)
    return min(configured_seconds, caller_seconds - margin)


# --- streaming -----------------------------------------------------------------------------


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
        state = self.pick(request.model_dump_json)
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
        state = self.pick(request.model_dump_json)
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
        shape: AnswerShape,
        request: GenerationRequest,
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
            "usage": usage_body(generation),
        }

    async def _stream(
        self,
        generator: ScriptGenerator,
        shape: AnswerShape,
        header: dict,
        prompt_ids: list[int],
        sampling: Sampling,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        chunk = {**header, "object": shape.chunk_object}
        if include_usage:
            chunk["usage"] = None
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        streamer = generator.text_streamer(
            lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
        )
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
                yield sse_event({**chunk, "choices": [shape.opening_delta]})
            while (piece := await pieces.get()) is not None:
                if text := held.push(piece):
                    yield sse_event({**chunk, "choices": [shape.delta(text, None)]})
            try:
                generation = await task
            except Exception as e:
                yield sse_event(error_body(f"generation failed: {e}", kind="server_error"))
                return
            if text := held.flush():
                yield sse_event({**chunk, "choices": [shape.delta(text, None)]})
            finish = FinishReason.STOP if held.stopped else generation.finish_reason
            yield sse_event({**chunk, "choices": [shape.delta("", finish.value)]})
            if include_usage:
                yield sse_event({**chunk, "choices": [], "usage": usage_body(generation)})
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client went away: stop generating at the next token
