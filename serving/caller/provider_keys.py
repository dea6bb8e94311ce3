"""The API keys of each provider in the script writer's chain, read once from where the
providers file says (an environment variable or a file mounted from a Secret): one key per
line, or a YAML/JSON list. Keys are named by their index in that list, never by their text:
no message, log line, status or metric carries a key."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from serving.caller.providers_config import ProviderConfig, ProviderConfigError

log = logging.getLogger(__name__)

KEY_PATTERN = re.compile(r"[!-~]+")
"""A key goes out as `Authorization: Bearer <key>`: printable ASCII without spaces."""


def parse_keys(text: str, source: str) -> tuple[str, ...]:
    """The keys in `text`: a YAML/JSON list of strings, or one key per line (blank lines and
    `#` comments skipped). `ProviderConfigError` names `source` and the key's index, never its
    text."""
    stripped = text.strip()
    if stripped.startswith(("[", "- ")):
        try:
            listed = yaml.safe_load(stripped)
        except yaml.YAMLError as e:
            # The parser's message quotes the text around the problem: a key. Its position only.
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ProviderConfigError(f"{source}: not a readable key list{where}") from None
        if not isinstance(listed, list):
            raise ProviderConfigError(f"{source}: a key list must be a list of strings")
        keys = listed
    else:
        keys = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
    for index, key in enumerate(keys):
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            raise ProviderConfigError(
                f"{source}: key {index} must be printable ASCII text without spaces"
            )
    repeated = sorted({i for i, key in enumerate(keys) if keys.index(key) != i})
    if repeated:
        raise ProviderConfigError(f"{source}: keys {repeated} repeat earlier keys")
    return tuple(keys)


def provider_keys(
    provider: ProviderConfig, environ: Mapping[str, str], own_token: str, placeholder: str
) -> tuple[str, ...]:
    """The keys `provider` is called with, in order; () when its variable or file is unset,
    missing or empty (the chain skips it). A provider needing no key (our endpoint) gets
    `own_token` when it has no `base_url` and one is set, else `placeholder`: the openai client
    wants some key, and no other provider ever sees our token."""
    if provider.api_key_env is not None:
        return parse_keys(environ.get(provider.api_key_env, ""), provider.api_key_env)
    if provider.api_keys_file is not None:
        path = Path(provider.api_keys_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ()
        except (OSError, UnicodeDecodeError) as e:
            raise ProviderConfigError(f"{path}: cannot read the keys file: {e}") from e
        return parse_keys(text, str(path))
    return ((provider.base_url is None and own_token) or placeholder,)


def chain_keys(
    providers: Sequence[ProviderConfig],
    environ: Mapping[str, str],
    own_token: str,
    placeholder: str,
) -> dict[str, tuple[str, ...]]:
    """Each provider's keys by name (`provider_keys`); a provider without any is logged as
    skipped, naming where its keys would come from."""
    keys = {}
    for provider in providers:
        keys[provider.name] = provider_keys(provider, environ, own_token, placeholder)
        if not keys[provider.name]:
            log.info(
                "script provider %s skipped: no keys in %s",
                provider.name,
                provider.api_key_env or provider.api_keys_file,
            )
    return keys


def redact(text: str, keys: Sequence[str]) -> str:
    """`text` with every key in it replaced by `key[<index>]`: a provider's error message may
    quote the key it was sent (as OpenAI's 401 does)."""
    for index, key in enumerate(keys):
        text = text.replace(key, f"key[{index}]")
    return text
