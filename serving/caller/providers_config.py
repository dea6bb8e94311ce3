"""The script writer's provider chain as configured: the typed providers and chain settings,
validated, and read from `script_providers.yaml`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from contentml.errors import UserError
from contentml.recipes import check_field_types

MAX_PROVIDER_NAME = 100
"""Longest provider name: it keys the shared usage store's rows and warnings."""


class ProviderConfigError(UserError):
    """The providers file or one of its providers has a value the chain cannot use."""


@dataclass(frozen=True)
class ProviderConfig:
    """One OpenAI-compatible provider in the chain, mirroring an entry of `providers:`."""

    name: str
    """Unique name, used in costs, logs and errors (e.g. `openai`, `contentml`)."""

    model: str
    """Model the chat completion asks for (`script` on our endpoint, e.g. `gpt-4o` hosted)."""

    base_url: str | None = None
    """Root of the provider's OpenAI API (`https://api.openai.com/v1`); None means our endpoint,
    `Settings.serving_url` + `/openai/v1`."""

    api_key_env: str | None = None
    """Environment variable holding the API key, or several (one per line, or a YAML/JSON
    list: `provider_keys`), read once when the chain is built; while it is unset or empty the
    provider is skipped. None: no key needed (our endpoint), or `api_keys_file`."""

    api_keys_file: str | None = None
    """File holding the API keys (a Secret mounted in the pod), one per line or a YAML/JSON
    list, read once when the chain is built; while it is missing or empty the provider is
    skipped. At most one of `api_key_env` and `api_keys_file`."""

    daily_quota_per_key: int | None = None
    """Requests each key may send per UTC day (the provider's quota); a key that has sent them
    is skipped until the next day, and the provider as a whole past 95 % of its keys' sum.
    None: no quota."""

    max_failures_per_hour: int | None = None
    """Failed requests (every key answering 429, 5xx, timeouts, no connection, malformed
    answers) in the last hour beyond which the chain skips the provider for `cooldown_seconds`
    after the latest one; None: never skipped for failures."""

    cooldown_seconds: float = 900.0
    """How long a provider past `max_failures_per_hour` is skipped; then one call tries it."""

    key_cooldown_seconds: float = 60.0
    """How long a key answered 429 without a `Retry-After` is skipped."""

    normal_latency_seconds: float | None = None
    """The provider's normal median answer time; None: learned from its last 7 days of calls.
    A current median above twice this is an early warning."""

    input_usd_per_million_tokens: float = 0.0
    """Price of 1M prompt tokens in USD."""

    output_usd_per_million_tokens: float = 0.0
    """Price of 1M completion tokens in USD."""

    requests_per_minute: int | None = None
    """Requests this client sends in any 60 s; None: no limit."""

    tokens_per_minute: int | None = None
    """Prompt + completion tokens in any 60 s (reserved as estimate + `max_tokens`, corrected
    to the answer's usage); None: no limit."""

    timeout_seconds: float | None = None
    """Limit of one request; None: `Settings.script_timeout_seconds` + 5 s. A call with a
    deadline cuts it to what is left (see `min_seconds`)."""

    min_seconds: float = 1.0
    """Least time worth giving this provider in a call with a deadline: with less left it is
    skipped, and the providers before it stop in time to leave it this much."""

    def __post_init__(self) -> None:
        check_field_types(self, ProviderConfigError)
        for name in ("name", "model", "api_key_env", "api_keys_file"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ProviderConfigError(f"{name} must not be empty")
        # The shared usage store keys rows (and its warnings) by the name.
        if len(self.name) > MAX_PROVIDER_NAME or not self.name.isprintable():
            raise ProviderConfigError(
                f"name must be printable and at most {MAX_PROVIDER_NAME} characters"
            )
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ProviderConfigError(
                f"base_url must start with http:// or https://, not {self.base_url!r}"
            )
        for name in ("input_usd_per_million_tokens", "output_usd_per_million_tokens"):
            price = getattr(self, name)
            if not (math.isfinite(price) and price >= 0):
                raise ProviderConfigError(f"{name} must be a finite price >= 0, not {price}")
        if self.api_key_env is not None and self.api_keys_file is not None:
            raise ProviderConfigError("set api_key_env or api_keys_file, not both")
        for name in (
            "requests_per_minute",
            "tokens_per_minute",
            "daily_quota_per_key",
            "max_failures_per_hour",
        ):
            limit = getattr(self, name)
            if limit is not None and limit < 1:
                raise ProviderConfigError(f"{name} must be at least 1 (or null), not {limit}")
        timeout = self.timeout_seconds
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ProviderConfigError(f"timeout_seconds must be positive, not {timeout}")
        for name in ("min_seconds", "cooldown_seconds", "key_cooldown_seconds"):
            seconds = getattr(self, name)
            if not (math.isfinite(seconds) and seconds > 0):
                raise ProviderConfigError(f"{name} must be positive, not {seconds}")
        normal = self.normal_latency_seconds
        if normal is not None and not (math.isfinite(normal) and normal > 0):
            raise ProviderConfigError(f"normal_latency_seconds must be positive, not {normal}")
        if timeout is not None and self.min_seconds > timeout:
            raise ProviderConfigError(
                f"min_seconds ({self.min_seconds}) must not exceed timeout_seconds ({timeout})"
            )


@dataclass(frozen=True)
class StrategistConfig:
    """The whole chain, mirroring `script_providers.yaml`."""

    providers: tuple[ProviderConfig, ...]
    """Providers in the order they are tried."""

    cache_ttl_seconds: float = 3600.0
    """How long a script answers identical requests; 0 turns the cache off."""

    cache_max_entries: int = 1024
    """Most scripts cached; expired ones, then the least recently used, make room for a new one."""

    def __post_init__(self) -> None:
        check_field_types(self, ProviderConfigError)
        if not self.providers or not all(isinstance(p, ProviderConfig) for p in self.providers):
            raise ProviderConfigError("providers must be a non-empty list of providers")
        names = [p.name for p in self.providers]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ProviderConfigError(f"providers have repeated names {repeated}")
        if not (math.isfinite(self.cache_ttl_seconds) and self.cache_ttl_seconds >= 0):
            raise ProviderConfigError(
                f"cache_ttl_seconds must be >= 0, not {self.cache_ttl_seconds}"
            )
        if self.cache_max_entries < 1:
            raise ProviderConfigError(
                f"cache_max_entries must be at least 1, not {self.cache_max_entries}"
            )


def load_config(path: Path) -> StrategistConfig:
    """The chain in `path`; any problem raises `ProviderConfigError` naming the file and field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ProviderConfigError(f"{path}: cannot read the providers file: {e}") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ProviderConfigError(f"{path}: not readable YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ProviderConfigError(f"{path}: must be a mapping with `providers`, got {raw!r}")
    _check_keys(path, "", raw, StrategistConfig)
    if not isinstance(raw["providers"], list) or not raw["providers"]:
        raise ProviderConfigError(f"{path}: providers must be a non-empty list")
    providers = []
    for i, item in enumerate(raw["providers"]):
        where = f"providers[{i}]"
        if not isinstance(item, dict):
            raise ProviderConfigError(f"{path}: {where} must be a mapping, got {item!r}")
        if isinstance(item.get("name"), str):
            where += f" ({item['name']})"
        _check_keys(path, f"{where}: ", item, ProviderConfig)
        try:
            providers.append(ProviderConfig(**item))
        except ProviderConfigError as e:
            raise ProviderConfigError(f"{path}: {where}: {e}") from e
    try:
        return StrategistConfig(**{**raw, "providers": tuple(providers)})
    except ProviderConfigError as e:
        raise ProviderConfigError(f"{path}: {e}") from e


def _check_keys(path: Path, where: str, raw: Mapping[Any, Any], config: type) -> None:
    """Every required field present and no unknown one, named with the file."""
    fields = dataclasses.fields(config)
    required = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ProviderConfigError(f"{path}: {where}missing fields {missing}")
    unknown = sorted(str(key) for key in raw.keys() - {f.name for f in fields})
    if unknown:
        raise ProviderConfigError(
            f"{path}: {where}unknown fields {unknown}; known: {[f.name for f in fields]}"
        )
