"""The token check in front of the `script` model: KServe's Hugging Face runtime (vLLM, the
OpenAI routes under `/openai/v1/`) checks no token, so the `script` InferenceService runs this
proxy as its transformer (`contentml auth-proxy`, manifests/base/serving/inferenceservices.yaml).
KServe sends the endpoint's traffic to the transformer and tells it where the predictor is
(`--predictor_host NAME.NAMESPACE`, its Service on port 80); the NetworkPolicy `script` keeps
the predictor's pods from everyone else.

Every request but the health routes needs `Authorization: Bearer <CONTENTML_API_TOKEN>`: the
model server's own `AdmissionMiddleware` checks it (constant time, 401 quoting nothing the
caller sent), with the names and body checks that come with it. An admitted request goes to the
predictor as it came (method, path, query, headers, body) but for the hop-by-hop headers, its
`Host` (the predictor's own, which Knative's gateway routes by) and its `Authorization` (the
predictor needs none, and a token should not travel further than it must). The answer comes
back as the predictor sends it, chunk by chunk: the server-sent events of a `stream: true`
chat completion reach the caller as vLLM writes them. A predictor that cannot be reached gets
502, one that does not answer in time 504, each saying so.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from contentml.errors import UserError
from contentml.settings import Settings
from serving.admission import Admission, AdmissionMiddleware, drain_on_sigterm

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5.0
"""How long a connection to the predictor may take: it is a Service in the same namespace
(or Knative's local gateway), so longer means it is not there."""

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
"""Headers of one connection, not of the message (RFC 9110, 7.6.1): never forwarded."""

REQUEST_DROPPED = HOP_BY_HOP | {"host", "content-length", "authorization"}
"""Request headers the predictor does not get: the Host is the predictor's own, the length is
the body's as sent on, and the token stops here."""

RESPONSE_DROPPED = HOP_BY_HOP | {"date", "server"}
"""Response headers the caller does not get from the predictor (uvicorn writes its own
`date` and `server`)."""

HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
"""Answered by the proxy itself, without a token: the kubelet's probes ask whether this
process serves, and must not wake (or keep awake) a predictor scaled to zero."""

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def predictor_url(predictor_host: str) -> httpx.URL:
    """The predictor's base URL from KServe's `--predictor_host` (`HOST[:PORT]`, plain HTTP
    inside the cluster; a full `http(s)://HOST[:PORT]` is taken as it is)."""
    text = predictor_host.strip()
    try:
        url = httpx.URL(text if "://" in text else f"http://{text}")
    except httpx.InvalidURL as e:
        raise UserError(f"--predictor_host {predictor_host!r} is not HOST[:PORT]: {e}") from e
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
        raise UserError(f"--predictor_host {predictor_host!r} is not HOST[:PORT]")
    if url.query or url.fragment or url.userinfo:
        raise UserError(f"--predictor_host {predictor_host!r} is not HOST[:PORT]")
    return url.copy_with(path="/")


def kept_headers(
    headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[str]
) -> list[tuple[bytes, bytes]]:
    """`headers` without the names in `dropped` and those the `Connection` header lists."""
    pairs = [(name.lower(), value) for name, value in headers]
    listed = {
        token.strip().decode("latin-1")
        for name, value in pairs
        if name == b"connection"
        for token in value.lower().split(b",")
    }
    return [(n, v) for n, v in pairs if n.decode("latin-1") not in dropped | listed]


class Relayed(StreamingResponse):
    """The predictor's answer, relayed chunk by chunk as it arrives, its bytes as sent (a
    compressed body stays compressed, with its `content-encoding` and length). The connection
    to the predictor is closed when the answer ends or the caller goes away."""

    def __init__(self, upstream: httpx.Response) -> None:
        super().__init__(self._chunks(upstream), status_code=upstream.status_code)
        self.raw_headers = kept_headers(upstream.headers.raw, RESPONSE_DROPPED)
        self.upstream = upstream

    @staticmethod
    async def _chunks(upstream: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.TransportError as e:
            # The status line is sent: all that is left is to cut the answer short.
            logger.warning("the predictor broke off its answer to %s: %r", upstream.url.path, e)
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()


class PredictorProxy:
    """Forwards requests to the predictor at `base` with one pooled HTTP client."""

    def __init__(self, base: httpx.URL, timeout: httpx.Timeout) -> None:
        self.base = base
        self.timeout = timeout
        # trust_env=False: an HTTP(S)_PROXY variable must not send the predictor's traffic, or
        # anything else, elsewhere. Redirects are the caller's to follow.
        self.client = httpx.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False)

    async def forward(self, request: Request) -> Response:
        """`request`, sent on to the predictor; its answer, or 502 / 504 without one."""
        scope = request.scope
        target = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        headers = kept_headers(scope["headers"], REQUEST_DROPPED)
        if not any(name == b"accept-encoding" for name, _ in headers):
            # Else httpx asks for gzip, and the caller would get a body it did not ask for.
            headers.append((b"accept-encoding", b"identity"))
        outgoing = self.client.build_request(
            request.method,
            self.base.copy_with(raw_path=target),
            headers=headers,
            content=await request.body(),
        )
        try:
            upstream = await self.client.send(outgoing, stream=True)
        except httpx.TimeoutException as e:
            return self._failed(504, f"did not answer within {self._limit(e)} s", e)
        except httpx.TransportError as e:
            return self._failed(502, "cannot be reached", e)
        return Relayed(upstream)

    def _limit(self, error: httpx.TimeoutException) -> float | None:
        if isinstance(error, httpx.ConnectTimeout):
            return self.timeout.connect
        return self.timeout.read

    def _failed(self, status: int, what: str, error: httpx.TransportError) -> JSONResponse:
        message = f"the script predictor at {self.base} {what} ({type(error).__name__}: {error})"
        logger.warning("%s", message)
        return JSONResponse({"error": message}, status)

    async def aclose(self) -> None:
        await self.client.aclose()


def _live(request: Request) -> JSONResponse:
    return JSONResponse({"live": True})


def _ready(request: Request) -> JSONResponse:
    return JSONResponse({"ready": True})


def auth_proxy_app(settings: Settings, predictor_host: str, *, drain: bool = False) -> ASGIApp:
    """The token check in front of the predictor at `predictor_host`: the ASGI app
    `run_auth_proxy` serves. `UserError` without `Settings.api_token` (it would forward every
    request unchecked). With `drain` (uvicorn serving it from the main thread), SIGTERM
    turns readiness to 503 for `Settings.shutdown_drain_seconds` before the server stops, as
    the model server does."""
    if not settings.api_token:
        raise UserError(
            "refusing to start the auth proxy without CONTENTML_API_TOKEN: it would forward "
            "every request to the predictor unchecked; set the token (the Secret "
            "contentml-api-token in the cluster)"
        )
    admission = Admission.from_settings(settings)
    proxy = PredictorProxy(
        predictor_url(predictor_host),
        httpx.Timeout(settings.script_timeout_seconds, connect=CONNECT_TIMEOUT_SECONDS),
    )
    draining = drain_on_sigterm(admission, settings.shutdown_drain_seconds) if drain else None

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            if draining is None:
                yield
            else:
                async with draining(app):
                    yield
        finally:
            await proxy.aclose()

    return Starlette(
        routes=[
            Route(HEALTH_PATHS[0], _live, methods=["GET"]),
            Route(HEALTH_PATHS[1], _ready, methods=["GET"]),
            Route("/{path:path}", proxy.forward, methods=list(METHODS)),
        ],
        middleware=[Middleware(AdmissionMiddleware, admission=admission)],
        lifespan=lifespan,
    )


def run_auth_proxy(settings: Settings, predictor_host: str, port: int) -> None:
    """Serve the token check on every interface at `port` (a pod's) until SIGTERM, which
    drains it like the model server; `UserError` without a token or with a malformed host."""
    app = auth_proxy_app(settings, predictor_host, drain=True)
    logger.info("auth proxy on :%d in front of %s", port, predictor_url(predictor_host))
    uvicorn.run(
        app,
        host="0.0.0.0",  # noqa: S104 (a pod's port; every request but health needs the token)
        port=port,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )
