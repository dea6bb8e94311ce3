"""Per-provider rate limits of the script writer's chain: requests and tokens per minute over
a sliding window, never waited for."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from serving.caller.provider_errors import RateLimitExhausted

Clock = Callable[[], float]
"""Seconds on a monotonic clock; rate windows and cache TTLs read it (tests pass a fake)."""

RATE_WINDOW_SECONDS = 60.0
"""The window that `requests_per_minute` and `tokens_per_minute` count over."""


@dataclass
class _Grant:
    """Requests and tokens one call holds in a rate window."""

    at: float
    tokens: int


class SlidingWindowLimit:
    """Requests and tokens per minute over a sliding window; thread-safe. `acquire` never
    waits: it raises `RateLimitExhausted` and the chain moves on."""

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Clock = time.monotonic,
        window_seconds: float = RATE_WINDOW_SECONDS,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.window_seconds = window_seconds
        self._clock = clock
        self._grants: deque[_Grant] = deque()
        self._lock = threading.Lock()

    def acquire(self, tokens: int) -> _Grant:
        """Reserve one request and `tokens` tokens now, or raise `RateLimitExhausted`."""
        with self._lock:
            now = self._clock()
            while self._grants and self._grants[0].at <= now - self.window_seconds:
                self._grants.popleft()
            rpm, tpm = self.requests_per_minute, self.tokens_per_minute
            if rpm is not None and len(self._grants) >= rpm:
                raise RateLimitExhausted(f"rate limit: {rpm} requests in the last minute")
            if tpm is not None:
                used = sum(grant.tokens for grant in self._grants)
                if used + tokens > tpm:
                    raise RateLimitExhausted(
                        f"rate limit: {used} of {tpm} tokens used in the last minute, "
                        f"this request needs up to {tokens}"
                    )
            grant = _Grant(at=now, tokens=tokens)
            self._grants.append(grant)
            return grant

    def settle(self, grant: _Grant, tokens: int) -> None:
        """Correct a reservation to the tokens the call actually used."""
        with self._lock:
            grant.tokens = tokens
