"""Admission control in front of the model server and the backend API: who may call, how many
requests each model takes at once, and when the cluster should stop routing here.

- Auth: with `Settings.api_token` set, every route but health and /metrics needs
  `Authorization: Bearer <token>`; other callers get 401, and the answer quotes nothing they
  sent. The admin routes (`ADMIN_ROUTES`: load and unload, quarantine and release, rewards,
  the batch job listing, the review queue) need `Settings.admin_token` instead: the callers'
  token gets 403 there. With neither token set nothing is checked, and the servers listen on
  loopback only (`bind_host`).
- Names: a route whose model name, version, channel id or experiment name is not one the
  platform could hold (`..`, NUL, `%2e%2e` once decoded, ...: `contentml.names`) gets 400
  saying why, before any handler.
- Bodies: once admitted (in its slot, below), every body is read and its nesting of arrays
  and objects checked before any route parses it: one nested deeper than `MAX_JSON_DEPTH` gets
  400 (Python's json module, `repr` and the encoders recurse per level: a RecursionError, a
  500, from about 1,000), one over `MAX_BODY_BYTES` 413. The routes' own, smaller, limits apply
  after.
- Backpressure: each route of each model takes `Settings.max_concurrent_requests` requests at
  once; the next one gets 429 with `Retry-After` at once, before its body is read, instead of
  waiting in a queue until its caller gives up. Only requests that wait without blocking the
  event loop pile up here (the task routes' thread pools, an async `predict`): KServe runs a
  synchronous `predict` on the loop itself, one request at a time, and the others wait in the
  socket, before any middleware sees them.
- Draining: from SIGTERM the readiness routes answer 503 (the cluster stops routing here) while
  every request, in flight or new, is still served for `Settings.shutdown_drain_seconds`; then
  uvicorn's own graceful shutdown closes the listener and waits up to
  `Settings.shutdown_grace_seconds` for the requests in flight.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import prometheus_client
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Lifespan, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from contentml import names
from contentml.errors import UserError
from contentml.settings import Settings

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
"""What a refused caller is told to wait: a slot frees as soon as one request of the model
ends, in milliseconds to seconds."""

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a request body may have; the platform's bodies nest
five levels at most (a V2 tensor's data one per dimension)."""

MAX_BODY_BYTES = 64 * 2**20
"""Largest body read for the depth check (413 beyond): at least every route's own limit, the
largest being a batch job's (`serving.backend.batch.routes.MAX_BATCH_BODY_BYTES`)."""

WS_POLICY_VIOLATION = 1008
"""WebSocket close code for a handshake refused for its token or names."""

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

BINARY_HEADER = "inference-header-content-length"
"""KServe's V2 binary extension: the body's first this many bytes are JSON, the rest tensor
bytes, whose brackets are data."""

THREAD_SCAN_BYTES = 2**20
"""Bodies larger than this are checked on a thread (numpy releases the GIL), not on the event
loop, which keeps answering other requests meanwhile."""

_SCAN_BLOCK = 2**20
"""Bytes `json_depth` takes at once: its arrays stay a few MB whatever the body's size."""

_QUOTE = ord('"')
_NOT_STRUCTURE = bytes(range(256)).translate(None, b'"[]{}')
# Byte -> the change of nesting it makes outside strings.
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1

REJECTED = prometheus_client.Counter(
    "contentml_requests_rejected",
    "Requests answered 429 because their model had its limit of requests in flight on the route",
    ["model", "route"],
)

MODEL_ROUTES = tuple(
    (template, compile_path(template)[0])
    for template in (
        "/v1/models/{model}:predict",
        "/v1/models/{model}:explain",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
    )
)
"""KServe's inference routes (POST): limited per model named in the path."""

READINESS = tuple(
    compile_path(template)[0]
    for template in (
        "/v2/health/ready",
        "/v2/models/{model}/ready",
        "/v2/models/{model}/versions/{version}/ready",
        "/v1/models/{model}",
    )
)
"""Readiness routes (GET): 503 while the server drains."""

PATH_NAMES = {
    "model": names.model_name,
    "version": names.version,
    "channel_id": names.channel_id,
    "experiment": names.revenue_experiment_name,
}
"""How each name a route takes from its path is checked, by the route's parameter."""

NAMED_ROUTES = tuple(
    compile_path(template)[0]
    for template in (
        "/v1/models/{model}:predict",
        "/v1/models/{model}:explain",
        "/v1/models/{model}",
        "/v2/models/{model}/versions/{version}/infer",
        "/v2/models/{model}/versions/{version}/ready",
        "/v2/models/{model}/versions/{version}",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/ready",
        "/v2/models/{model}",
        "/v2/repository/models/{model}/load",
        "/v2/repository/models/{model}/unload",
        "/v1/channels/{channel_id:path}/metrics",
        "/v1/channels/{channel_id:path}/quarantine",
        "/v1/channels/{channel_id:path}",
        "/v1/experiments/{experiment:path}/report.html",
        "/v1/experiments/{experiment:path}/rewards",
        "/v1/experiments/{experiment:path}",
    )
)
"""Every route naming a model, a version, a channel or an experiment, most specific first: a
bare `/v1/models/{model}` would read `trend:predict` as a model name. The CrisisManager and
RevenueOptimizer routes take `:path` so a name with an (encoded) slash gets its 400 too."""

OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/metrics", "/metrics/"})
"""Answered without a token: the kubelet's probes and Prometheus' scrapes carry none."""

ADMIN_ROUTES = tuple(
    (method, compile_path(template)[0])
    for method, template in (
        ("POST", "/v2/repository/models/{model:path}/load"),
        ("POST", "/v2/repository/models/{model:path}/unload"),
        ("POST", "/v1/channels/{channel_id:path}/quarantine"),
        ("DELETE", "/v1/channels/{channel_id:path}/quarantine"),
        ("POST", "/v1/experiments/{experiment:path}/rewards"),
        ("GET", "/batch/jobs"),
        ("GET", "/v1/review/items"),
        ("GET", "/v1/review/items/{item_id:path}"),
        ("POST", "/v1/review/items/{item_id:path}/decision"),
    )
)
"""Routes that change what is served or what is learnt, or list every caller's work: they
need `Settings.admin_token`. `:path`, so that no spelling of a name slips past as a caller's
route."""

UNAUTHORIZED = (
    "missing or wrong bearer token: send `Authorization: Bearer <token>` with the server's "
    "CONTENTML_API_TOKEN"
)

FORBIDDEN = (
    "an admin route: send `Authorization: Bearer <token>` with the server's "
    "CONTENTML_ADMIN_TOKEN, not the callers' token"
)

TOKEN_COOKIE = "contentml_token"
"""Cookie a browser may hold the token in (the console sets it, `SameSite=Strict`: no other
site's page sends it along), for pages whose scripts cannot read it to set a header."""

COOKIE_WRITE_HEADER = "x-contentml-console"
"""Header a request that changes something must carry for its `TOKEN_COOKIE` to count (any
value): a page of another site cannot set it without a CORS preflight, which these servers
never grant, so a forged form or script cannot use the operator's cookie even where a browser
ignores `SameSite` (OWASP's custom-request-header defence against CSRF)."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

TOKEN_QUERY = "token"
"""Query parameter that carries the token where a browser cannot set a header at all."""

QUERY_TOKEN_PATHS = frozenset({"/v1/events", "/console"})
"""Routes a browser opens without headers of its own (a WebSocket, an `EventSource`, a link):
they take the token as `?token=` too. Nowhere else: a URL ends up in logs and histories."""

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is reachable from this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def bind_host(settings: Settings, host: str | None, insecure: bool = False) -> str:
    """The address a server listens on: `host`, or by default every interface where a token
    is set and loopback where none is. `UserError` for a host beyond loopback without a token,
    unless `insecure` (the caller's explicit choice)."""
    token = settings.api_token or settings.admin_token
    if host is None:
        return "0.0.0.0" if token else "127.0.0.1"  # noqa: S104 (a pod's port, token-checked)
    if not token and not is_loopback(host) and not insecure:
        raise UserError(
            f"refusing to listen on {host} without a token: anyone who reaches it could call "
            "every route. Set CONTENTML_API_TOKEN (and CONTENTML_ADMIN_TOKEN), listen on "
            "loopback (--host 127.0.0.1), or pass --insecure"
        )
    return host


@dataclass
class Admission:
    """What `AdmissionMiddleware` enforces, and its state: one per server process, shared by
    the middleware and the SIGTERM handler of `drain_on_sigterm`."""

    max_concurrent: int
    """Requests one route of one model takes at once."""

    token: str = field(default="", repr=False)
    """Bearer token every route but `OPEN_PATHS` and `ADMIN_ROUTES` requires; empty: none."""

    admin_token: str = field(default="", repr=False)
    """Bearer token `ADMIN_ROUTES` require, which opens the others too. Empty: the admin
    routes are closed (403) where `token` is set, open where it is not."""

    models: frozenset[str] = frozenset()
    """Models served here. A KServe route naming another is not counted (KServe answers 404),
    so made-up names add neither pools nor metric labels."""

    fixed_routes: Mapping[str, str] = field(default_factory=dict)
    """Limited routes that name no model in their path (the task and OpenAI routes) -> the
    model they count under."""

    max_body_bytes: int = MAX_BODY_BYTES
    """Largest body read for the depth check; 413 beyond."""

    draining: bool = False
    """Set on SIGTERM: readiness answers 503 from then on."""

    in_flight: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Requests being answered per (route, model)."""

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, not {self.max_concurrent}")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        models: Iterable[str] = (),
        fixed_routes: Mapping[str, str] | None = None,
    ) -> Admission:
        """The limit and token of `settings`, for `models` and `fixed_routes` (see the fields)."""
        return cls(
            settings.max_concurrent_requests,
            settings.api_token,
            settings.admin_token,
            frozenset(models),
            dict(fixed_routes or {}),
        )

    def pool(self, method: str, path: str) -> tuple[str, str] | None:
        """The (route, model) whose limit a request counts against; None: not limited."""
        if method != "POST":
            return None
        if path in self.fixed_routes:
            return path, self.fixed_routes[path]
        for template, pattern in MODEL_ROUTES:
            match = pattern.match(path)
            if match and match["model"] in self.models:
                return template, match["model"]
        return None

    def refusal(self, scope: Scope) -> JSONResponse | None:
        """The answer to a request refused before any limit: 401 without a valid token, 403
        with the callers' token on an admin route, 503 to a readiness check while draining;
        None: admitted so far."""
        path = scope["path"]
        if (refused := self._token_refusal(scope["method"], path, scope)) is not None:
            return refused
        if (problem := _name_problem(path)) is not None:
            return JSONResponse({"error": problem}, 400)
        if self.draining and scope["method"] == "GET" and any(r.match(path) for r in READINESS):
            return JSONResponse({"error": "shutting down: finishing the requests in flight"}, 503)
        return None

    def _token_refusal(self, method: str, path: str, scope: Scope) -> JSONResponse | None:
        if not (self.token or self.admin_token) or path in OPEN_PATHS:
            return None
        credentials = _credentials(scope)
        is_admin = _matches(self.admin_token, credentials)
        if any(m == method and pattern.match(path) for m, pattern in ADMIN_ROUTES):
            if is_admin:
                return None
            if _matches(self.token, credentials):
                return JSONResponse({"error": FORBIDDEN}, 403)
        elif is_admin or not self.token or _matches(self.token, credentials):
            return None
        return JSONResponse({"error": UNAUTHORIZED}, 401, {"WWW-Authenticate": "Bearer"})


def _credentials(scope: Scope) -> bytes | None:
    """The token a request carries: its `Bearer` header, else its `TOKEN_COOKIE` (on a request
    that changes something, only beside `COOKIE_WRITE_HEADER`), else (on `QUERY_TOKEN_PATHS`
    only) its `TOKEN_QUERY` parameter; None without any."""
    headers = Headers(scope=scope)
    if (bearer := _bearer(headers)) is not None:
        return bearer
    cookie = cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE)
    if cookie and (scope.get("method", "GET") in SAFE_METHODS or COOKIE_WRITE_HEADER in headers):
        return cookie.encode("latin-1", errors="replace")
    if scope["path"] in QUERY_TOKEN_PATHS:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if values := query.get(TOKEN_QUERY):
            return values[-1].encode("latin-1", errors="replace")
    return None


def _bearer(headers: Headers) -> bytes | None:
    """The credentials of a `Bearer` authorization header, or None."""
    scheme, credentials = get_authorization_scheme_param(headers.get("authorization"))
    # As bytes: compare_digest refuses strings with non-ASCII characters (headers are latin-1).
    return credentials.encode("latin-1") if scheme.lower() == "bearer" else None


def _matches(token: str, credentials: bytes | None) -> bool:
    """Whether `credentials` are `token`, in constant time; an empty token matches nothing."""
    if not token or credentials is None:
        return False
    return hmac.compare_digest(credentials, token.encode())


def _name_problem(path: str) -> str | None:
    """What is wrong with a name `path` holds (`PATH_NAMES`), or None."""
    for pattern in NAMED_ROUTES:
        if (match := pattern.match(path)) is not None:
            try:
                for parameter, value in match.groupdict().items():
                    PATH_NAMES[parameter](value)
            except names.NameRefused as e:
                return str(e)
            return None
    return None


def json_depth(body: bytes) -> int:
    """How deep `body` nests arrays and objects, brackets in strings aside; in a malformed body,
    the most brackets open at once (a parser recurses into them before it fails). Vectorised,
    not per byte in Python, and without regular expressions (whose cost some bodies make
    quadratic): 15 MB of V1 instances take about 0.1 s, 64 MB of brackets about 1 s."""
    # Escaped backslashes go first, then escaped quotes: every quote left opens or closes a
    # string, and a byte is inside one when an odd number of quotes precede it. Of the rest,
    # only brackets matter (bytes.translate drops the others in C).
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = np.frombuffer(unescaped.translate(None, _NOT_STRUCTURE), dtype=np.uint8)
    depth = deepest = 0
    in_string = False
    for start in range(0, text.size, _SCAN_BLOCK):
        block = text[start : start + _SCAN_BLOCK]
        inside = np.logical_xor.accumulate(block == _QUOTE) ^ in_string
        in_string = bool(inside[-1])
        running = depth + np.cumsum(np.where(inside, 0, _STEP[block]), dtype=np.int64)
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
    return deepest


def _depth_problem(body: bytes) -> str | None:
    """What is wrong with how deep `body` nests, or None."""
    # No more openers than the limit cannot nest deeper: most bodies are settled by counting.
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return None
    depth = json_depth(body)
    if depth <= MAX_JSON_DEPTH:
        return None
    return (
        f"the body nests arrays and objects {depth} levels deep: at most {MAX_JSON_DEPTH} are taken"
    )


def _json_part(body: bytes, headers: Headers) -> bytes:
    """The JSON part of `body`: all of it, but in a V2 binary request (`BINARY_HEADER`)."""
    length = headers.get(BINARY_HEADER, "")
    # No more digits than the body's length has: Python reads at most 4,300 as a number.
    if length.isascii() and length.isdigit() and len(length) <= len(str(len(body))):
        return body[: int(length)]
    return body


class AdmissionMiddleware:
    """Pure ASGI middleware applying an `Admission`. A request refused for its token, its
    names or its model's limit is answered before its body is read: such a refusal costs the
    server microseconds."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admission = self.admission
        refusal = admission.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        pool = admission.pool(scope["method"], scope["path"])
        if pool is None:
            await self._with_checked_body(scope, receive, send)
            return
        if admission.in_flight[pool] >= admission.max_concurrent:
            route, model = pool
            REJECTED.labels(model, route).inc()
            busy = JSONResponse(
                {
                    "error": f"{model} has {admission.max_concurrent} requests in flight on "
                    f"{route}, its limit: retry after {RETRY_AFTER_SECONDS} s"
                },
                429,
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
            await busy(scope, receive, send)
            return
        admission.in_flight[pool] += 1
        try:
            await self._with_checked_body(scope, receive, send)
        finally:
            admission.in_flight[pool] -= 1
            if not admission.in_flight[pool]:
                del admission.in_flight[pool]

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket handshake is a GET: the same token and name checks. A refusal answers
        the handshake with its HTTP status where the server can (ASGI's denial response),
        else closes it (policy violation: uvicorn answers 403)."""
        refusal = self.admission.refusal({**scope, "method": "GET"})
        if refusal is None:
            await self.app(scope, receive, send)
            return
        socket = WebSocket(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await socket.send_denial_response(refusal)
        else:
            await socket.close(WS_POLICY_VIOLATION)

    async def _with_checked_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, given the body once it is read and passed `_depth_problem`; a body too
        large or too deep is answered here. Read within the request's slot, as the route
        would read it."""
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.admission.max_body_bytes
        chunks = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the caller is gone: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await JSONResponse({"error": f"body over {limit} bytes"}, 413)(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        checked = _json_part(body, Headers(scope=scope))
        if len(checked) > THREAD_SCAN_BYTES:
            problem = await asyncio.to_thread(_depth_problem, checked)
        else:
            problem = _depth_problem(checked)
        if problem is not None:
            await JSONResponse({"error": problem}, 400)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app `body`, already read, then what the caller sends next
    (a disconnect, which streaming routes watch for)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def drain_on_sigterm(
    admission: Admission, seconds: float, on_stop: Callable[[], Awaitable[None]] | None = None
) -> Lifespan[Any]:
    """The lifespan of an app uvicorn serves that turns SIGTERM into a drain: `admission` turns
    not ready at once, every request is still served for `seconds`, then `on_stop` runs to its
    end (it ends the streams that would otherwise hold the server up: `/v1/events`'
    subscriptions) and then uvicorn's own handler (it closes the listener, waits for the
    requests in flight up to its `timeout_graceful_shutdown`, and returns from `serve`).
    SIGINT (Ctrl+C) still stops at once."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        # uvicorn installs its handler while it serves and restores the previous one when it
        # stops, which removes this one too.
        stop = signal.getsignal(signal.SIGTERM)
        if not callable(stop):
            raise RuntimeError(
                f"SIGTERM has no server handler to drain into ({stop!r}): "
                "serve the app with uvicorn, from the main thread"
            )
        loop = asyncio.get_running_loop()
        finishing: list[asyncio.Task] = []  # a reference, so the task is not collected

        def drain() -> None:
            if admission.draining:
                return
            admission.draining = True
            logger.info("SIGTERM: not ready; serving %g s more, then finishing", seconds)
            loop.call_later(seconds, lambda: finishing.append(loop.create_task(finish())))

        async def finish() -> None:
            # uvicorn's handler only after `on_stop` is done: uvicorn would otherwise close the
            # streams itself, as a restart (1012), before they say they are going away.
            if on_stop is not None:
                await on_stop()
            stop(signal.SIGTERM, None)

        # A signal handler runs between any two bytecodes of the loop: it only schedules.
        signal.signal(signal.SIGTERM, lambda signum, frame: loop.call_soon_threadsafe(drain))
        yield

    return lifespan
