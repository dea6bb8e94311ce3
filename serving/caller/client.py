"""Client the content pipeline uses to call our KServe model server.

Three calls, one per served task: `predict_trend` and `score_quality` go to KServe's v1
`:predict` routes over httpx; `generate_script` goes to the server's OpenAI-compatible
`/openai/v1` routes through the `openai` client. All three share one retry loop with the same
rules: retry 5xx answers, connection errors and attempt timeouts with exponential backoff and
jitter; retry a 429 or 503 with `Retry-After` (a busy or draining server) after the delay it
asks for, or give up at once when that is past the deadline; never retry another 4xx or a
malformed answer; and stop when the task's deadline (the total time of the call, retries
included) is spent.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import httpx

from contentml.protocol import OPENAI_ROUTE_PREFIX, TASK_ROUTES, Task

if TYPE_CHECKING:
    import openai

__all__ = [
    "BadResponse",
    "ClientError",
    "ContentMLClient",
    "ContentMLClientError",
    "RetryLater",
    "ServerError",
    "ServiceUnavailable",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The OpenAI client insists on a key; our endpoint ignores it unless it checks tokens.
PLACEHOLDER_API_KEY = "contentml-no-key"

# Backoff delays vary by up to this fraction either way, so clients that failed together
# do not retry in lockstep.
_JITTER = 0.1

# Longest server text quoted in an error message.
_MAX_QUOTED_CHARS = 300


class ContentMLClientError(Exception):
    """Base of every error this client raises (argument errors stay `ValueError`)."""


class ClientError(ContentMLClientError):
    """The server rejected the request (4xx); retrying the same request cannot help."""

    def __init__(self, task: Task, status_code: int, message: str) -> None:
        super().__init__(f"{task} request rejected with HTTP {status_code}: {message}")
        self.task = task
        self.status_code = status_code
        """HTTP status of the answer (400-499)."""
        self.message = message
        """The server's error message: `error` of the JSON body, else the body's text."""


class ServerError(ContentMLClientError):
    """The server failed (5xx). Retried; never raised by a call itself, but the last one is
    the `__cause__` of the `ServiceUnavailable` that ends the call."""

    def __init__(self, task: Task, status_code: int, message: str) -> None:
        super().__init__(f"{task} request failed with HTTP {status_code}: {message}")
        self.task = task
        self.status_code = status_code
        self.message = message


class RetryLater(ContentMLClientError):
    """The server is busy or draining (429 or 503 with `Retry-After`). Retried after the delay it
    asks for when that fits in the deadline; like `ServerError`, only ever the `__cause__` of
    the `ServiceUnavailable` that ends the call."""

    def __init__(self, task: Task, status_code: int, message: str, retry_after: float) -> None:
        super().__init__(
            f"{task} request refused with HTTP {status_code}, retry after {retry_after:g}s: "
            f"{message}"
        )
        self.task = task
        self.status_code = status_code
        self.message = message
        self.retry_after = retry_after
        """Seconds the server asked to wait before the next attempt."""


class BadResponse(ContentMLClientError):
    """The server answered 2xx, but not with what the route promises (not JSON, no
    `predictions`, no message content). Not retried: it is a server bug, not a hiccup."""

    def __init__(self, task: Task, problem: str, body: str = "") -> None:
        detail = f": {_quote(body)}" if body else ""
        super().__init__(f"malformed {task} response, {problem}{detail}")
        self.task = task
        self.body = body
        """The answer's text, as received."""


class ServiceUnavailable(ContentMLClientError):
    """Retries or the deadline ran out. `__cause__` is the last failure: a `ServerError`, or
    the transport error (`httpx.ConnectError`, `httpx.ReadTimeout`,
    `openai.APIConnectionError`, ...)."""

    def __init__(
        self, task: Task, attempts: int, elapsed: float, deadline: float, last_error: object
    ) -> None:
        super().__init__(
            f"{task} call gave up after {attempts} attempt(s) in {elapsed:.2f}s "
            f"(deadline {deadline:g}s); last failure: {last_error!r}"
        )
        self.task = task
        self.attempts = attempts
        """Requests sent before giving up."""


# Failures of one attempt that a later attempt may not see.
_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    ServerError,
    RetryLater,
    httpx.TimeoutException,
    httpx.NetworkError,
    # The server closed the connection without answering (a restarting pod).
    httpx.RemoteProtocolError,
)
"""The script route adds the openai client's connection errors and timeouts."""


class ContentMLClient:
    """Calls the model server at `base_url` (e.g. `Settings.serving_url`)."""

    DEADLINES: ClassVar[Mapping[Task, float]] = MappingProxyType(
        {task: route.sla_seconds for task, route in TASK_ROUTES.items()}
    )
    """Seconds a whole call may take, retries included: the tasks' SLAs."""

    def __init__(
        self,
        base_url: str,
        *,
        retries: int = 3,
        backoff_seconds: float = 0.2,
        api_key: str | None = None,
        deadlines: Mapping[Task | str, float] | None = None,
    ) -> None:
        """
        Args:
            base_url: Root of the model server, e.g. "http://127.0.0.1:8080".
            retries: Further attempts after the first fails transiently.
            backoff_seconds: Wait before the first retry; doubles for each further one.
            api_key: Bearer token for the server (its `Settings.api_token`); None sends none to
                the KServe routes and a placeholder to the OpenAI routes (a server without a
                token checks none).
            deadlines: Overrides of `DEADLINES` for this client, keyed by `Task` or its value.
        """
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        if backoff_seconds < 0:
            raise ValueError(f"backoff_seconds must be >= 0, not {backoff_seconds}")
        merged = dict(self.DEADLINES)
        for key, seconds in (deadlines or {}).items():
            try:
                task = Task(key)
            except ValueError as e:
                raise ValueError(
                    f"unknown task {key!r} in deadlines; expected one of {[t.value for t in Task]}"
                ) from e
            if not seconds > 0:
                raise ValueError(f"deadline for {task} must be > 0 seconds, not {seconds}")
            merged[task] = float(seconds)
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.deadlines: Mapping[Task, float] = MappingProxyType(merged)

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.Client(base_url=self.base_url, headers=headers)
        self._api_key = api_key
        self._openai: openai.OpenAI | None = None
        self._openai_lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pools; the client cannot be used afterwards."""
        self._http.close()
        if self._openai is not None:
            self._openai.close()

    def predict_trend(
        self,
        *,
        series_id: str | None = None,
        history: list[float] | None = None,
        horizon: int = 48,
    ) -> dict[str, Any]:
        """Forecast a series the server knows (`series_id`) or the given `history`.

        Returns the prediction (a dict with at least `forecast`).
        """
        if (series_id is None) == (history is None):
            raise ValueError("pass exactly one of series_id and history")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, not {horizon}")
        if history is not None:
            # float() also turns numpy scalars into values JSON can carry.
            instance: dict[str, Any] = {"history": [float(x) for x in history]}
        else:
            instance = {"series_id": series_id}
        instance["horizon"] = horizon
        return self._predict(Task.TREND, "trend", instance)

    def score_quality(self, text: str, kind: str = "script") -> dict[str, Any]:
        """Score `text` (a `kind` of content, e.g. "script"); returns the prediction dict."""
        return self._predict(Task.QUALITY, "quality", {"text": text, "kind": kind})

    def _script_client(self) -> openai.OpenAI:
        """The openai client of the script route, made on the first script call: the openai
        SDK takes most of a second to import, which every server and batch worker importing
        this module would otherwise pay at start."""
        import openai

        with self._openai_lock:
            if self._openai is None:
                # Its own retries would also retry 408/409/429 and restart the timeout on
                # each attempt, so it makes one attempt per call and `_call` drives the retries.
                self._openai = openai.OpenAI(
                    base_url=f"{self.base_url}{OPENAI_ROUTE_PREFIX}/v1",
                    api_key=self._api_key or PLACEHOLDER_API_KEY,
                    max_retries=0,
                    timeout=self.deadlines[Task.SCRIPT],
                )
            return self._openai

    def generate_script(
        self,
        topic: str,
        channel_persona: str,
        *,
        max_tokens: int = 512,
        model: str = "script",
    ) -> str:
        """Write a video script about `topic` in the voice of `channel_persona`."""
        request: dict[str, Any] = {
            "model": model,
            "messages": [
                {
                    "role": "system",
                    "content": f"You write video scripts for a channel. {channel_persona}",
                },
                {"role": "user", "content": f"Write a video script about {topic}."},
            ],
            # KServe's chat-completions schema has `max_tokens`, not `max_completion_tokens`.
            "max_tokens": max_tokens,
        }

        import openai  # for its errors; `_script_client` loads it

        client = self._script_client()

        def attempt(timeout: float) -> str:
            try:
                completion = client.chat.completions.create(**request, timeout=timeout)
            except openai.APIStatusError as e:
                raise _status_error(
                    Task.SCRIPT, e.status_code, _message(e.body, e.message), e.response.headers
                ) from e
            except openai.APIResponseValidationError as e:
                raise BadResponse(Task.SCRIPT, str(e), str(e.body or "")) from e
            return _script_text(completion)

        # The openai client's connection errors and timeouts (`APITimeoutError` subclasses it).
        return self._call(Task.SCRIPT, attempt, (*_TRANSIENT_ERRORS, openai.APIConnectionError))

    def _predict(self, task: Task, model: str, instance: dict[str, Any]) -> dict[str, Any]:
        path = f"/v1/models/{model}:predict"
        payload = {"instances": [instance]}

        def attempt(timeout: float) -> dict[str, Any]:
            response = self._http.post(path, json=payload, timeout=timeout)
            if not response.is_success:
                raise _status_error(
                    task, response.status_code, _response_message(response), response.headers
                )
            try:
                body = response.json()
            except ValueError as e:
                raise BadResponse(task, "not JSON", response.text) from e
            predictions = body.get("predictions") if isinstance(body, dict) else None
            if not isinstance(predictions, list) or not predictions:
                raise BadResponse(task, "no `predictions` list", response.text)
            if not isinstance(predictions[0], dict):
                raise BadResponse(task, "prediction is not an object", response.text)
            return predictions[0]

        return self._call(task, attempt)

    def _call(
        self,
        task: Task,
        attempt: Callable[[float], T],
        transient: tuple[type[Exception], ...] = _TRANSIENT_ERRORS,
    ) -> T:
        """Run `attempt(timeout)` until it succeeds, fails for good (an error not in
        `transient`), or `task`'s deadline or the retries run out. Each attempt's timeout is
        the time left; a retry waits at least what a `RetryLater` asked for, and is not made
        when that wait ends past the deadline."""
        deadline = self.deadlines[task]
        start = time.monotonic()
        end = start + deadline
        attempts = 0
        last_error: Exception | None = None
        while attempts <= self.retries:
            if attempts:
                delay = self.backoff_seconds * 2 ** (attempts - 1)
                delay *= 1 + random.uniform(-_JITTER, _JITTER)
                if isinstance(last_error, RetryLater):
                    delay = max(delay, last_error.retry_after)
                if time.monotonic() + delay >= end:
                    break
                time.sleep(delay)
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            attempts += 1
            try:
                return attempt(remaining)
            except transient as e:
                last_error = e
                log.warning("%s attempt %d failed: %r", task, attempts, e)
        elapsed = time.monotonic() - start
        raise ServiceUnavailable(task, attempts, elapsed, deadline, last_error) from last_error


def _status_error(
    task: Task, status_code: int, message: str, headers: Mapping[str, str]
) -> ContentMLClientError:
    """The error for a non-2xx answer: a 429 or 503 with `Retry-After` retried after that
    delay, other 5xx retried, other 4xx not, anything else malformed."""
    retry_after = _retry_after(headers.get("retry-after"))
    if status_code in (429, 503) and retry_after is not None:
        return RetryLater(task, status_code, message, retry_after)
    if status_code >= 500:
        return ServerError(task, status_code, message)
    if status_code >= 400:
        return ClientError(task, status_code, message)
    return BadResponse(task, f"unexpected HTTP {status_code}", message)


def _retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` value asks to wait: delay-seconds or an HTTP date (RFC 9110,
    10.2.3); None when there is none or it is unreadable."""
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    date = email.utils.parsedate_tz(value)
    if date is None:
        return None
    return max(0.0, email.utils.mktime_tz(date) - time.time())


def _response_message(response: httpx.Response) -> str:
    """The server's error message: `error` of a JSON body, else the body's text."""
    try:
        body = response.json()
    except ValueError:
        return _quote(response.text) or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return _message(body["error"], response.text)
    return _quote(response.text)


def _message(error: object, fallback: str) -> str:
    """Text of an `error` value: a string as is, OpenAI's `{"message": ...}` object's message."""
    if isinstance(error, str) and error:
        return error
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if error is not None:
        return _quote(json.dumps(error))
    return _quote(fallback)


class MalformedCompletion(ValueError):
    """An answer of an OpenAI-compatible endpoint that is not a chat completion with text."""

    def __init__(self, problem: str, body: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.body = body


def chat_text(completion: object) -> str:
    """The message content of a chat completion (the client's and the strategist's parsing);
    `MalformedCompletion` naming what is missing."""
    if isinstance(completion, str):
        # The openai client hands back the text of an answer that is not JSON.
        raise MalformedCompletion("not JSON", completion)
    try:
        content = completion.choices[0].message.content  # type: ignore[attr-defined]
    except (AttributeError, IndexError, TypeError) as e:
        raise MalformedCompletion("no choices[0].message", repr(completion)) from e
    if not isinstance(content, str):
        raise MalformedCompletion("message has no text content", repr(completion))
    return content


def _script_text(completion: object) -> str:
    """The message content of a chat completion; BadResponse if there is none."""
    try:
        return chat_text(completion)
    except MalformedCompletion as e:
        raise BadResponse(Task.SCRIPT, e.problem, e.body) from e


def _quote(text: str) -> str:
    text = text.strip()
    if len(text) > _MAX_QUOTED_CHARS:
        return text[:_MAX_QUOTED_CHARS] + "..."
    return text
