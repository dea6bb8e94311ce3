"""The OpenAI-compatible routes of the `script` model: `/openai/v1/completions`,
`/openai/v1/chat/completions` (both with `stream`) and `/openai/v1/models`, on the same KServe
ModelServer as the other predictors; they parse a request (`openai_schema`) and the caller's
timeout header, hand it to the `ScriptModel` it names, and answer errors as OpenAI does.

KServe 0.21 has an OpenAI layer (`kserve.protocol.rest.openai`), but its request and response
types are vLLM's: it imports only with `kserve[llm]`, which pins vllm 0.24 and with it
torch 2.11, against our torch 2.13. KServe registers those routes only when that import works,
so it stays out of the way and these routes serve the same paths with our own pydantic types,
following OpenAI's API: the same request fields, response bodies, server-sent events
(`data: {chunk}` lines, then `data: [DONE]`) and error bodies (`{"error": {"message", "type",
"param", "code"}}`).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import TypeVar

import pydantic
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from kserve.model import BaseKServeModel

from contentml.protocol import OPENAI_ROUTE_PREFIX, TIMEOUT_HEADER
from serving.model_server.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    RequestError,
    error_body,
)
from serving.model_server.script import ScriptModel

Req = TypeVar("Req", bound=GenerationRequest)


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
