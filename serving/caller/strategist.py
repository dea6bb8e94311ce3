"""The ContentStrategist's script writer: `generate_script(topic, channel_persona)`.

One call walks a fallback chain of OpenAI-compatible providers (`script_providers.yaml`, e.g. a
hosted API, then our KServe endpoint) and returns the first script written, with its cost and
the quality gate's decision:

- Fallback: a provider that is down, times out, answers 5xx or 429, answers something that is
  not a chat completion, or has spent its rate limit is skipped and the next one is tried. A 4xx
  other than 429 is the caller's mistake and is raised as `ClientError`: the next provider
  would refuse the same request. When every provider fails, `AllProvidersFailed` lists why.
- Deadline: a call may pass one (the task route passes its SLA). Each provider then waits the
  smaller of its `timeout_seconds` and what is left, less the `min_seconds` (+
  `HANDOFF_SECONDS`) of each provider after it, so a hung first provider still leaves the next
  one time to answer. A provider with less than its own `min_seconds` left is skipped
  (`NoTimeLeft`). The openai clients never retry: a retry could outlast the deadline, and the
  next provider is the retry. Each request says how long it will be waited for in
  `TIMEOUT_HEADER`, so our server ends a slow generation in time to answer with its text so far.
- Rate limits: requests and tokens per minute per provider, over a sliding window. An
  exhausted provider is skipped, not waited for, so a call never blocks on a limit. A request
  reserves its estimated tokens (prompt estimate + `max_tokens`); the reservation is corrected
  to the tokens the answer reports (or to 0 when it fails).
- Keys: a provider may have several API keys (`provider_keys`). Each call takes the available
  key that sent the fewest requests today, across replicas (the shared store,
  `provider_usage`), ties in turn. A key answered 429 is skipped by every replica until its
  `Retry-After`, and the same call tries the provider's next key; a key that sent its
  `daily_quota_per_key` rests until the next UTC day. Keys are named by index only: a
  provider's message quoting one is redacted.
- Contingency: a provider past 95 % of today's quota, or past its `max_failures_per_hour`, is
  skipped until the next day or its cool-down (`provider_monitor`), so the chain's later
  providers (ending with our self-hosted model) write the scripts; each answered call is
  recorded (key, answer time, quality score) and the early warnings checked.
- Cache: an identical request (topic, persona, length, `max_tokens`, temperature, chain) within
  the TTL is answered from memory (a `cachetools.TTLCache`): `cached=True`, cost 0.
- Cost: from the answer's token usage and the provider's prices; returned with each script and
  summed per provider (`costs()`).
- Quality: every new script is scored by the quality model (`/v1/models/quality:predict`). If
  the quality model cannot be reached the script is marked `review` with the reason: a person
  looks at it rather than it passing unchecked or being thrown away. A script marked `review`
  is put in the review queue (`training/quality/review_store.py`, the shared SQL store) with
  the channel and video it is for. Rejected and unscored scripts are not cached, so the next
  request writes (and scores) a new one.

The chain's configuration is read by `providers_config`, its rate limits kept by `rate_limit`,
and why a provider is skipped is named by `provider_errors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import cachetools
import httpx

from contentml.protocol import OPENAI_ROUTE_PREFIX, TIMEOUT_HEADER, Task
from contentml.settings import Settings
from serving.caller.client import (
    PLACEHOLDER_API_KEY,
    ClientError,
    ContentMLClient,
    ContentMLClientError,
    MalformedCompletion,
    chat_text,
)
from serving.caller.provider_errors import (
    KeysExhausted,
    NoTimeLeft,
    ProviderSkipped,
    ProviderUnavailable,
)
from serving.caller.provider_keys import chain_keys, redact
from serving.caller.provider_monitor import ProviderMonitor, ProviderState
from serving.caller.provider_usage import ProviderUsage, WallClock
from serving.caller.providers_config import ProviderConfig, ProviderConfigError, load_config
from serving.caller.rate_limit import Clock, SlidingWindowLimit
from training.quality.gate import Decision
from training.quality.review_store import NewItem, ReviewStore, Source, check_name

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

QualityScorer = Callable[[str], Mapping[str, Any]]
"""Scores a script's text and returns the quality model's prediction (`decision`, `score`,
`reasons`), as `ContentMLClient.score_quality` does; raises `ContentMLClientError` when it
cannot score."""

OUR_ENDPOINT_PATH = f"{OPENAI_ROUTE_PREFIX}/v1"
"""Where our model server's OpenAI-compatible routes live, under `Settings.serving_url`."""

TIMEOUT_MARGIN_SECONDS = 5.0
"""Added to `Settings.script_timeout_seconds` for providers without `timeout_seconds`: our server
answers with the text so far when that time is up, and the margin lets the answer arrive."""

HANDOFF_SECONDS = 0.25
"""Kept per later provider, on top of its `min_seconds`, by the providers before it in a call
with a deadline: a timed-out request comes back a little after its timeout, and the next
provider must still find its minimum left."""

WORDS_PER_SECOND = 2.5
"""Speaking pace (150 words a minute) that turns a script's target length into words."""

CHARS_PER_TOKEN = 4
"""Rough characters per token for English text: enough to reserve rate-limit tokens."""

TOKENS_PER_MESSAGE = 4
"""Tokens a chat message costs beyond its text (role and separators)."""


class AllProvidersFailed(ContentMLClientError):
    """Every provider in the chain failed; `failures` says why each did."""

    def __init__(self, failures: Sequence[tuple[str, ProviderUnavailable]]) -> None:
        listed = "; ".join(f"{name}: {error}" for name, error in failures)
        super().__init__(f"every script provider failed: {listed}")
        self.failures = tuple(failures)
        """(provider name, its failure) in chain order."""


@dataclass(frozen=True)
class Script:
    """A generated video script and what it took to get it."""

    text: str
    provider: str
    """Name of the provider that wrote it."""
    model: str
    prompt_tokens: int
    """As the provider reported (estimated when it reported no usage)."""
    completion_tokens: int
    cost_usd: float
    """What this call cost: 0 for a cached answer."""
    cached: bool
    """True when answered from the cache, without a call."""
    quality_decision: Decision
    """The quality gate's decision: pass, review (a person decides) or reject."""
    quality_score: float | None
    """The quality model's score; None when it could not be reached."""
    quality_reasons: tuple[str, ...]
    """Why the gate did not pass it ("check: detail"), or why it could not score it."""
    latency_s: float
    """Seconds this call took, quality scoring included."""


@dataclass(frozen=True)
class ProviderCosts:
    """What one provider's successful calls used and cost so far."""

    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


@dataclass(frozen=True)
class ScriptProvider:
    """A provider ready to call: its config, resolved URL and timeout, one client per key and
    its rate limit."""

    config: ProviderConfig
    base_url: str
    timeout_seconds: float
    """Limit of one request when the call has no deadline (or more time than this left)."""
    clients: tuple[openai.OpenAI, ...]
    """One per API key, in the keys' order (a key is its index), each built with
    `max_retries=0`: the chain moves on instead of retrying a provider."""
    limit: SlidingWindowLimit

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class _Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    key_index: int = 0
    latency_s: float = 0.0


@dataclass(frozen=True)
class _Quality:
    decision: Decision
    score: float | None
    reasons: tuple[str, ...]
    scored: bool
    findings: tuple[Mapping[str, str], ...] = ()
    """The gate's reasons as it gave them (`check`, `severity`, `detail`), for a review item."""
    labels: Mapping[str, float] = dataclasses.field(default_factory=dict)
    model_version: str | None = None


class ContentStrategist:
    """Writes video scripts through the provider chain; see the module docstring."""

    def __init__(
        self,
        providers: Sequence[ScriptProvider],
        quality: QualityScorer,
        *,
        monitor: ProviderMonitor,
        default_max_tokens: int,
        cache_ttl_seconds: float = 3600.0,
        cache_max_entries: int = 1024,
        clock: Clock = time.monotonic,
        on_close: Sequence[Callable[[], None]] = (),
        reviews: ReviewStore | None = None,
    ) -> None:
        """
        Args:
            providers: The chain, in the order it is tried; at least one, none of whose
                clients retries (`max_retries=0`).
            quality: Scores each new script (`ContentMLClient.score_quality` in production).
            monitor: The providers' shared usage: which keys and providers to skip, where each
                call is recorded.
            default_max_tokens: `max_tokens` of calls that do not pass one.
            cache_ttl_seconds: How long a script answers identical requests; 0: no cache.
            cache_max_entries: Most scripts cached (the least recently used makes room).
            clock: Monotonic seconds for rate windows and the cache's TTL.
            on_close: Called by `close()`, after the providers' clients are closed.
            reviews: The review queue a script the gate sends to `review` is put in; None:
                not queued.
        """
        if not providers:
            raise ValueError("the chain needs at least one provider")
        retrying = [p.name for p in providers if any(c.max_retries for c in p.clients)]
        if retrying:
            raise ValueError(f"clients of {retrying} retry: a retry could outlast the deadline")
        self.providers = tuple(providers)
        # What each provider leaves for the ones after it, in a call with a deadline.
        self._reserves = tuple(
            sum(p.config.min_seconds + HANDOFF_SECONDS for p in self.providers[i + 1 :])
            for i in range(len(self.providers))
        )
        self.default_max_tokens = default_max_tokens
        self._quality = quality
        # cachetools' caches are not thread-safe: `_cache_lock` guards every use.
        self._cache: cachetools.TTLCache[tuple, Script] = cachetools.TTLCache(
            maxsize=cache_max_entries, ttl=cache_ttl_seconds, timer=clock
        )
        self._cache_lock = threading.Lock()
        self._chain = tuple((p.name, p.config.model, p.base_url) for p in self.providers)
        self._costs = {p.name: ProviderCosts(0, 0, 0, 0.0) for p in self.providers}
        self._costs_lock = threading.Lock()
        self._on_close = tuple(on_close)
        self._reviews = reviews
        self.monitor = monitor
        # Requests per (provider, key) this process sent and has not yet recorded in the
        # usage store: concurrent calls spread over the keys before the store counts them.
        self._in_flight: Counter[tuple[str, int]] = Counter()
        self._turn: Counter[str] = Counter()
        self._keys_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        environ: Mapping[str, str] | None = None,
        quality: QualityScorer | None = None,
        http_client: httpx.Client | None = None,
        clock: Clock = time.monotonic,
        wall_clock: WallClock = time.time,
    ) -> ContentStrategist:
        """The chain in `settings.script_providers`, with API keys read from `environ` (default
        `os.environ`) or their files now, not per call. Providers without keys are skipped.
        Usage is shared through `settings.backend_store`.

        Args:
            quality: Scorer of scripts; None: our quality model via `ContentMLClient`.
            http_client: Shared by the providers' openai clients (tests pass a fake transport).
            wall_clock: UNIX seconds of the shared usage (days, `Retry-After`, the last hour).
        """
        # Imported here: the SDK takes most of a second to import, which the server and its
        # batch workers would pay at start, before any script is asked for.
        import openai

        config = load_config(settings.script_providers)
        environ = os.environ if environ is None else environ
        # Our own endpoint (no base_url) gets its token; no other provider ever sees it.
        keys = chain_keys(config.providers, environ, settings.api_token, PLACEHOLDER_API_KEY)
        providers = []
        for provider in config.providers:
            if not keys[provider.name]:
                continue
            base_url = provider.base_url or settings.serving_url.rstrip("/") + OUR_ENDPOINT_PATH
            timeout = provider.timeout_seconds or (
                settings.script_timeout_seconds + TIMEOUT_MARGIN_SECONDS
            )
            clients = tuple(
                openai.OpenAI(
                    base_url=base_url, api_key=key, max_retries=0, http_client=http_client
                )
                for key in keys[provider.name]
            )
            limit = SlidingWindowLimit(
                provider.requests_per_minute, provider.tokens_per_minute, clock
            )
            providers.append(ScriptProvider(provider, base_url, timeout, clients, limit))
        if not providers:
            # Only providers needing a key can be skipped, so each of them names its source.
            needed = sorted({str(p.api_key_env or p.api_keys_file) for p in config.providers})
            raise ProviderConfigError(
                f"{settings.script_providers}: no usable script provider; set one of {needed}"
            )
        usage = ProviderUsage.from_settings(settings, now=wall_clock)
        monitor = ProviderMonitor(config, {n: len(k) for n, k in keys.items()}, usage)
        reviews = ReviewStore.from_settings(settings)
        on_close: list[Callable[[], None]] = [monitor.close, reviews.close]
        if quality is None:
            quality_client = ContentMLClient(settings.serving_url, api_key=settings.api_token)
            quality = quality_client.score_quality
            on_close.append(quality_client.close)
        return cls(
            providers,
            quality,
            monitor=monitor,
            default_max_tokens=settings.script_max_tokens,
            cache_ttl_seconds=config.cache_ttl_seconds,
            cache_max_entries=config.cache_max_entries,
            clock=clock,
            on_close=on_close,
            reviews=reviews,
        )

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
        """Close the providers' connections (and the quality client this object made)."""
        for provider in self.providers:
            for client in provider.clients:
                client.close()
        for close in self._on_close:
            close()

    def costs(self) -> dict[str, ProviderCosts]:
        """Calls, tokens and USD per provider since this object was made (cache hits are free
        and not counted)."""
        with self._costs_lock:
            return dict(self._costs)

    def generate_script(
        self,
        topic: str,
        channel_persona: str,
        *,
        target_seconds: int = 60,
        max_tokens: int | None = None,
        temperature: float = 0.7,
        deadline: float | None = None,
        channel: str | None = None,
        video_id: str | None = None,
    ) -> Script:
        """A script of about `target_seconds` spoken about `topic`, in the voice of
        `channel_persona`, scored by the quality gate.

        Args:
            deadline: `time.monotonic()` by which a provider must have answered (scoring the
                script comes after); None: each provider waits its own `timeout_seconds`.
            channel, video_id: What the script is for, kept with its review item when the gate
                sends it to review.

        Raises:
            ValueError: an empty topic or persona, or a parameter out of range.
            ClientError: a provider refused the request (4xx other than 429).
            AllProvidersFailed: no provider could answer, or none had time left; lists each
                one's failure.
        """
        topic = _required("topic", topic)
        channel_persona = _required("channel_persona", channel_persona)
        max_tokens = self.default_max_tokens if max_tokens is None else max_tokens
        if isinstance(target_seconds, bool) or target_seconds < 1:
            raise ValueError(f"target_seconds must be >= 1, not {target_seconds!r}")
        if isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, not {max_tokens!r}")
        if not 0 <= temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], not {temperature!r}")
        if deadline is not None and not math.isfinite(deadline):
            raise ValueError(f"deadline must be a finite time.monotonic(), not {deadline!r}")
        check_name(channel, "channel")
        check_name(video_id, "video_id")

        start = time.perf_counter()
        key = (topic, channel_persona, target_seconds, max_tokens, temperature, self._chain)
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None:
            return dataclasses.replace(
                hit, cached=True, cost_usd=0.0, latency_s=time.perf_counter() - start
            )

        messages = _messages(topic, channel_persona, target_seconds)
        prompt_estimate = _estimate_prompt_tokens(messages)
        request = {
            "messages": messages,
            # KServe's chat-completions schema has `max_tokens`, not `max_completion_tokens`.
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        failures: list[tuple[str, ProviderUnavailable]] = []
        for index, provider in enumerate(self.providers):
            try:
                answer = self._ask(
                    index,
                    request,
                    prompt_estimate + max_tokens,
                    lambda i=index: self._timeout(i, deadline),
                )
                break
            except ProviderUnavailable as e:
                log.warning("script provider %s failed, trying the next: %s", provider.name, e)
                failures.append((provider.name, e))
        else:
            raise AllProvidersFailed(failures)

        try:
            if not answer.prompt_tokens and not answer.completion_tokens:
                # No usage in the answer: estimate, so cost and rate limits still see the call.
                answer = dataclasses.replace(
                    answer,
                    prompt_tokens=prompt_estimate,
                    completion_tokens=_estimate_tokens(answer.text),
                )
            cost = self._account(provider, answer)
            quality = _judge(self._quality, answer.text)
            self._queue_review(answer.text, quality, channel, video_id)
            self.monitor.usage.record_call(
                provider.name,
                answer.key_index,
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                latency_s=answer.latency_s,
                quality_score=quality.score,
            )
        finally:
            self._release_key(provider.name, answer.key_index)
        self.monitor.check()
        script = Script(
            text=answer.text,
            provider=provider.name,
            model=provider.config.model,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            cost_usd=cost,
            cached=False,
            quality_decision=quality.decision,
            quality_score=quality.score,
            quality_reasons=quality.reasons,
            latency_s=time.perf_counter() - start,
        )
        if quality.scored and quality.decision is not Decision.REJECT:
            with self._cache_lock:
                self._cache[key] = script
        return script

    def _queue_review(
        self, text: str, quality: _Quality, channel: str | None, video_id: str | None
    ) -> None:
        """Put a script the gate sent to review (or could not score) in the review queue; a
        queue that cannot be written is logged: the script is still returned, marked review."""
        if self._reviews is None or quality.decision is not Decision.REVIEW:
            return
        item = NewItem(
            text=text,
            reasons=quality.findings,
            labels=quality.labels,
            source=Source.STRATEGIST,
            score=quality.score,
            channel=channel,
            video_id=video_id,
            model_version=quality.model_version,
        )
        try:
            self._reviews.add(item)
        except Exception as e:  # the caller still gets the script and its review mark
            log.error("script could not be queued for review: %s", e, exc_info=e)

    def _timeout(self, index: int, deadline: float | None) -> float:
        """Seconds provider `index` may take: its own timeout, cut to what is left of
        `deadline` less what the providers after it need; `NoTimeLeft` when that is under its
        own `min_seconds`."""
        provider = self.providers[index]
        if deadline is None:
            return provider.timeout_seconds
        left = deadline - time.monotonic()
        reserve = self._reserves[index]
        if left - reserve < provider.config.min_seconds:
            kept = f", {reserve:g} s of it kept for the providers after it" if reserve else ""
            raise NoTimeLeft(
                f"skipped: {max(left, 0):.2f} s left of the deadline{kept}; "
                f"it needs at least {provider.config.min_seconds:g} s"
            )
        return min(provider.timeout_seconds, left - reserve)

    def _ask(
        self,
        index: int,
        request: dict[str, Any],
        tokens: int,
        timeout: Callable[[], float],
    ) -> _Answer:
        """Provider `index`'s answer, from its keys in turn while they answer 429, each
        request within `timeout()` seconds (httpx applies it to each of connect, write and
        read); `ProviderUnavailable` when the chain should move on."""
        provider = self.providers[index]
        state = self.monitor.state(provider.name)
        if state.skip_reason is not None:
            raise ProviderSkipped(f"skipped (contingency): {state.skip_reason}")
        seconds = timeout()  # NoTimeLeft before any key or rate limit is taken
        grant = provider.limit.acquire(tokens)
        used = 0
        tried: set[int] = set()
        try:
            while True:
                key = self._take_key(provider, state, tried)
                answer = None
                try:
                    answer = self._ask_key(provider, key, request, seconds)
                finally:
                    if answer is None:  # an answer's key is released once its call is recorded
                        self._release_key(provider.name, key)
                if answer is not None:
                    used = answer.prompt_tokens + answer.completion_tokens or tokens
                    return answer
                tried.add(key)
                if len(tried) == len(provider.clients):
                    self.monitor.usage.record_failure(provider.name)
                    raise ProviderUnavailable(f"HTTP 429 from each of its {len(tried)} keys")
                seconds = timeout()
        finally:
            provider.limit.settle(grant, used)

    def _take_key(self, provider: ScriptProvider, state: ProviderState, tried: set[int]) -> int:
        """The available key (not tried in this call) that sent the fewest requests today,
        counting this process's requests not yet recorded; ties go round in turn."""
        available = [k.index for k in state.keys if k.available]
        candidates = [i for i in available if i not in tried]
        if not candidates:
            limited = len(provider.clients) - len(available)
            raise KeysExhausted(
                f"no key left to try: {limited} of {len(provider.clients)} keys rate-limited or "
                f"out of today's quota"
                + (f", {len(tried)} answered 429 in this call" if tried else "")
            )
        name, count = provider.name, len(provider.clients)
        with self._keys_lock:
            # Read under the lock: a call recorded since `state` was read is counted once,
            # in the store, as its key is released only after the record.
            requests = self.monitor.usage.requests_today(name)
            turn = self._turn[name]
            key = min(
                candidates,
                key=lambda i: (requests.get(i, 0) + self._in_flight[name, i], (i - turn) % count),
            )
            self._turn[name] = key + 1
            self._in_flight[name, key] += 1
        return key

    def _release_key(self, provider: str, key: int) -> None:
        with self._keys_lock:
            self._in_flight[provider, key] -= 1

    def _ask_key(
        self, provider: ScriptProvider, key: int, request: dict[str, Any], timeout: float
    ) -> _Answer | None:
        """The answer of `provider` with key `key`; None when the key answered 429 (recorded:
        every replica skips it until its `Retry-After`)."""
        import openai  # loaded by `from_settings`, which made the clients

        client = provider.clients[key]
        keys = [c.api_key for c in provider.clients]
        started = time.perf_counter()
        try:
            completion = client.chat.completions.create(
                model=provider.config.model,
                timeout=timeout,
                # Sent to every provider: hosted APIs ignore headers they do not know, and a
                # provider with a `base_url` may be another deployment of our server. `repr`
                # keeps every digit: a rounded value could read as 0 or as more than we wait.
                extra_headers={TIMEOUT_HEADER: repr(timeout)},
                **request,
            )
            answer = _answer(completion)
            return dataclasses.replace(
                answer, key_index=key, latency_s=time.perf_counter() - started
            )
        except openai.APIStatusError as e:
            message = redact(e.message, keys)
            if e.status_code == 429:
                wait = retry_after(e.response.headers, provider.config.key_cooldown_seconds)
                log.warning(
                    "script provider %s key %d answered 429, skipped for %.0f s: %s",
                    provider.name, key, wait, message,
                )  # fmt: skip
                self.monitor.usage.record_rate_limit(provider.name, key, wait)
                return None
            if e.status_code >= 500:
                self.monitor.usage.record_failure(provider.name)
                raise ProviderUnavailable(f"HTTP {e.status_code}: {message}") from None
            # `from None`: the openai error's own message may quote the key.
            raise ClientError(Task.SCRIPT, e.status_code, f"{provider.name}: {message}") from None
        except openai.APITimeoutError as e:
            self.monitor.usage.record_failure(provider.name)
            raise ProviderUnavailable(f"no answer within {timeout:.2f} s") from e
        except openai.APIConnectionError as e:
            self.monitor.usage.record_failure(provider.name)
            raise ProviderUnavailable(f"{type(e).__name__}: {redact(str(e), keys)}") from e
        except (openai.APIResponseValidationError, ProviderUnavailable) as e:
            self.monitor.usage.record_failure(provider.name)
            if isinstance(e, ProviderUnavailable):
                raise
            raise ProviderUnavailable(f"malformed answer: {redact(str(e), keys)}") from e

    def _account(self, provider: ScriptProvider, answer: _Answer) -> float:
        config = provider.config
        cost = (
            answer.prompt_tokens * config.input_usd_per_million_tokens
            + answer.completion_tokens * config.output_usd_per_million_tokens
        ) / 1_000_000
        with self._costs_lock:
            before = self._costs[provider.name]
            self._costs[provider.name] = ProviderCosts(
                calls=before.calls + 1,
                prompt_tokens=before.prompt_tokens + answer.prompt_tokens,
                completion_tokens=before.completion_tokens + answer.completion_tokens,
                cost_usd=before.cost_usd + cost,
            )
        return cost


def retry_after(headers: Mapping[str, str], default: float) -> float:
    """Seconds a 429's `Retry-After` (seconds or an HTTP date; OpenAI's `retry-after-ms`)
    says to wait, within [1 s, 1 day]; `default` without one."""
    seconds = default
    if (ms := headers.get("retry-after-ms")) is not None:
        with contextlib.suppress(ValueError):
            seconds = float(ms) / 1000
    elif (value := headers.get("retry-after")) is not None:
        try:
            seconds = float(value)
        except ValueError:
            with contextlib.suppress(TypeError, ValueError):
                at = email.utils.parsedate_to_datetime(value)
                seconds = at.timestamp() - time.time()
    if not math.isfinite(seconds):
        seconds = default
    return min(max(seconds, 1.0), 86400.0)


def _messages(topic: str, persona: str, target_seconds: int) -> list[dict[str, str]]:
    words = round(target_seconds * WORDS_PER_SECOND)
    return [
        {
            "role": "system",
            "content": f"You write short video scripts for a channel, in its voice. {persona}",
        },
        {
            "role": "user",
            "content": (
                f"Write a video script of about {target_seconds} seconds (about {words} "
                f"spoken words) about: {topic}"
            ),
        },
    ]


def _estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    return sum(_estimate_tokens(m["content"]) + TOKENS_PER_MESSAGE for m in messages)


def _answer(completion: object) -> _Answer:
    """Text and usage of a chat completion; `ProviderUnavailable` if it is not one."""
    try:
        text = chat_text(completion)
    except MalformedCompletion as e:
        raise ProviderUnavailable(f"malformed answer, {e.problem}: {e.body[:200]!r}") from e
    if not text.strip():
        raise ProviderUnavailable("malformed answer, no script text")
    usage = getattr(completion, "usage", None)
    return _Answer(
        text=text,
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
    )


def _judge(quality: QualityScorer, text: str) -> _Quality:
    """The gate's verdict on `text`; `review` with the reason when it cannot be had, so an
    unscored script is neither published unchecked nor thrown away."""
    try:
        prediction = quality(text)
    except ContentMLClientError as e:
        log.warning("quality model unavailable, script sent to review: %s", e)
        return _unscored(f"quality model unavailable: {e}")
    try:
        decision = Decision(prediction["decision"])
        score = float(prediction["score"])
        reasons = tuple(f"{r['check']}: {r['detail']}" for r in prediction.get("reasons", ()))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        log.warning("malformed quality answer, script sent to review: %r", prediction)
        return _unscored(f"malformed quality answer: {e!r}")
    findings = tuple(dict(r) for r in prediction.get("reasons", ()))
    version = prediction.get("model_version")
    return _Quality(
        decision,
        score,
        reasons,
        True,
        findings,
        dict(prediction.get("labels", {})),
        None if version is None else str(version),
    )


def _unscored(reason: str) -> _Quality:
    """A script the gate could not score: a person reviews it."""
    finding = {"check": "quality", "severity": "review", "detail": reason}
    return _Quality(Decision.REVIEW, None, (reason,), False, (finding,))


def _required(name: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    return value.strip()
