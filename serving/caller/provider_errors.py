"""Why one provider of the script writer's chain cannot answer now: the chain skips it and
tries the next."""

from __future__ import annotations

from serving.caller.client import ContentMLClientError


class ProviderUnavailable(ContentMLClientError):
    """One provider cannot answer now (down, overloaded, over its rate limit, or answering
    nonsense); the chain tries the next. `__cause__` is the underlying error, if any."""


class RateLimitExhausted(ProviderUnavailable):
    """A provider has spent its requests or tokens of the last minute."""


class NoTimeLeft(ProviderUnavailable):
    """Too little of the call's deadline is left to try a provider: it is skipped unasked."""


class KeysExhausted(ProviderUnavailable):
    """Every key of a provider is inside its `Retry-After` or has sent its daily quota."""


class ProviderSkipped(ProviderUnavailable):
    """A provider in contingency (past 95 % of today's quota, or past its failure threshold)
    is skipped until the next day or the end of its cool-down."""
