"""Explainable policy checks every script, title and description passes before it is published.

The learned toxicity classifier says how bad a text looks; these checks say what is wrong with it
(a banned term, a phone number, a link to an unknown site, a copy of published content, a title
over YouTube's limit), so an editor knows what to fix and a reviewer can see why the gate fired.
The term lists, domains and limits are data in `policy.yaml`; this module only applies them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import phonenumbers
import yaml
from datasketch import MinHash, MinHashLSH

from contentml.errors import UserError

DEFAULT_POLICY = Path(__file__).with_name("policy.yaml")
"""The policy the gate applies unless given another file."""

SHINGLE_SIZE = 5
"""Characters per shingle of the near-duplicate check (see `_shingles`)."""

MAX_DUPLICATE_FINDINGS = 3
"""Most near-duplicate findings per text: the closest few explain it; more would be noise."""

EXCERPT_LENGTH = 60
"""Characters of a published text quoted in a near-duplicate finding."""

# False negatives (a copy the LSH never proposes) are lost for good, while false positives are
# only candidates that the exact Jaccard below discards, so the LSH banding leans towards recall.
_LSH_WEIGHTS = (0.2, 0.8)

# Local part kept to its first character when masked; the domain is not personal on its own.
_EMAIL = re.compile(
    r"(?<![\w.+-])([\w.%+-]+)@((?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,})\b", re.IGNORECASE
)
# Characters that end a link when they are its last ones: sentence punctuation, closing brackets.
_LINK_TRAILING = ".,;:!?)]}'\""
_NON_ALPHANUMERIC = re.compile(r"[\W_]+")
# A digit with at least two more digits after it: everything a masked phone number hides.
_MASKED_DIGIT = re.compile(r"\d(?=(?:\D*\d){2})")


class TextKind(StrEnum):
    """What a text is, which decides its length limit."""

    SCRIPT = "script"
    TITLE = "title"
    DESCRIPTION = "description"


class Severity(StrEnum):
    """What the gate does with a finding: a person looks at it, or the text is refused."""

    REVIEW = "review"
    REJECT = "reject"


class Check(StrEnum):
    """The policy checks; a finding's `check` says which one fired."""

    BANNED_TERM = "banned_term"
    BRAND_SAFETY = "brand_safety"
    PERSONAL_DATA = "personal_data"
    UNKNOWN_LINK = "unknown_link"
    NEAR_DUPLICATE = "near_duplicate"
    LENGTH = "length"


CHECK_SEVERITY: Mapping[Check, Severity] = {
    Check.BANNED_TERM: Severity.REJECT,
    Check.BRAND_SAFETY: Severity.REVIEW,
    Check.PERSONAL_DATA: Severity.REJECT,
    Check.UNKNOWN_LINK: Severity.REVIEW,
    Check.NEAR_DUPLICATE: Severity.REVIEW,
    Check.LENGTH: Severity.REJECT,
}
"""Severity of each check: refuse what is never publishable, send what may be fine to a person."""


_TERM_LABELS = {Check.BANNED_TERM: "banned term", Check.BRAND_SAFETY: "brand-safety term"}


class PolicyError(UserError):
    """The policy file or configuration is missing, malformed or out of range."""


@dataclass(frozen=True)
class Finding:
    """One reason a text breaks the policy, in words an editor can act on."""

    check: Check
    """Which check fired (a `Check`, so it also compares equal to its string name)."""
    severity: Severity
    """What the gate does about it."""
    detail: str
    """One sentence naming what fired, e.g. "banned term 'xxx'"; personal data comes masked."""


@dataclass(frozen=True)
class PolicyConfig:
    """The lists and limits the checks apply, mirroring `policy.yaml`."""

    banned_terms: tuple[str, ...]
    """Words and phrases that get a text rejected (obscenities, slurs); whole-word match."""
    brand_safety_terms: tuple[str, ...]
    """Words and phrases advertisers avoid; a text with one goes to review. Whole-word match."""
    phone_regions: tuple[str, ...]
    """ISO region codes (`US`, `GB`) whose national phone formats are recognised."""
    allowed_domains: tuple[str, ...]
    """Domains links may point to; any subdomain of one is allowed too."""
    bare_link_tlds: tuple[str, ...]
    """Top-level domains that make a bare `name.tld` count as a link (`file.py` must not)."""
    duplicate_threshold: float
    """Jaccard similarity of shingle sets, in (0, 1], from which a text copies a published one."""
    num_perm: int
    """MinHash permutations: more estimate similarity better and cost more time and memory."""
    max_length: Mapping[TextKind, int]
    """Most characters allowed for each kind of text; every kind must have a limit."""

    def __post_init__(self) -> None:
        for name in (
            "banned_terms",
            "brand_safety_terms",
            "phone_regions",
            "allowed_domains",
            "bare_link_tlds",
        ):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(
                isinstance(item, str) and item.strip() for item in value
            ):
                raise PolicyError(f"{name} must be a list of non-empty strings, got {value!r}")
        unknown_regions = sorted(set(self.phone_regions) - phonenumbers.SUPPORTED_REGIONS)
        if unknown_regions:
            raise PolicyError(f"phone_regions has unknown region codes {unknown_regions}")
        for name in ("allowed_domains", "bare_link_tlds"):
            bad = [item for item in getattr(self, name) if item != item.lower() or "/" in item]
            if bad:
                raise PolicyError(f"{name} must be lower-case names without a scheme, got {bad}")
        threshold = self.duplicate_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise PolicyError(f"duplicate_threshold must be a number, got {threshold!r}")
        if not 0.0 < threshold <= 1.0:
            raise PolicyError(f"duplicate_threshold must be in (0, 1], got {threshold}")
        if isinstance(self.num_perm, bool) or not isinstance(self.num_perm, int):
            raise PolicyError(f"num_perm must be an integer, got {self.num_perm!r}")
        if self.num_perm < 2:
            raise PolicyError(f"num_perm must be at least 2, got {self.num_perm}")
        if not isinstance(self.max_length, Mapping):
            raise PolicyError(
                f"max_length must map each text kind to a limit, got {self.max_length!r}"
            )
        missing = [kind.value for kind in TextKind if kind not in self.max_length]
        if missing:
            raise PolicyError(f"max_length has no limit for {missing}")
        for kind, limit in self.max_length.items():
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise PolicyError(f"max_length[{kind}] must be a positive integer, got {limit!r}")


def load_policy(path: Path = DEFAULT_POLICY) -> PolicyConfig:
    """The policy in `path`; any problem raises `PolicyError` naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"{path}: policy file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: not readable YAML: {e}") from e
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: must be a mapping of policy fields, got {type(raw).__name__}")
    expected = {field.name for field in fields(PolicyConfig)}
    missing = sorted(expected - raw.keys())
    if missing:
        raise PolicyError(f"{path}: missing fields {missing}")
    unknown = sorted(str(key) for key in raw.keys() - expected)
    if unknown:
        raise PolicyError(f"{path}: unknown fields {unknown}")
    values: dict[str, Any] = {
        name: tuple(value) if isinstance(value, list) else value for name, value in raw.items()
    }
    if isinstance(values["max_length"], dict):
        try:
            values["max_length"] = {TextKind(kind): v for kind, v in values["max_length"].items()}
        except ValueError as e:
            raise PolicyError(
                f"{path}: max_length: {e}; kinds are {[kind.value for kind in TextKind]}"
            ) from e
    try:
        return PolicyConfig(**values)
    except PolicyError as e:
        raise PolicyError(f"{path}: {e}") from e


class PolicyChecker:
    """Applies a policy to texts; regexes and the near-duplicate index are built once, here."""

    def __init__(self, config: PolicyConfig, published: Iterable[str] = ()) -> None:
        self.config = config
        self._terms = {
            Check.BANNED_TERM: _term_pattern(config.banned_terms),
            Check.BRAND_SAFETY: _term_pattern(config.brand_safety_terms),
        }
        self._link = _link_pattern(config.bare_link_tlds)
        # One template MinHash: copies share its permutations instead of drawing them again.
        self._minhash = MinHash(num_perm=config.num_perm)
        self._lsh = MinHashLSH(
            threshold=config.duplicate_threshold, num_perm=config.num_perm, weights=_LSH_WEIGHTS
        )
        # Exact repeats (a video trending on many days) are indexed once. Shingle sets are not
        # kept: recomputing them for the few LSH candidates is cheaper than holding them all.
        self._published: list[str] = []
        with self._lsh.insertion_session() as session:
            for text in dict.fromkeys(published):
                shingles = _shingles(text)
                if shingles:
                    session.insert(
                        len(self._published), self._sketch(shingles), check_duplication=False
                    )
                    self._published.append(text)

    def check(self, text: str, kind: TextKind) -> list[Finding]:
        """Every policy finding for `text` as a `kind`, each once; an empty list means it passes."""
        found = [
            *self._term_findings(text),
            *self._personal_data_findings(text),
            *self._link_findings(text),
            *self._duplicate_findings(text),
            *self._length_findings(text, kind),
        ]
        return list(dict.fromkeys(found))

    def _term_findings(self, text: str) -> Iterator[Finding]:
        for check, pattern in self._terms.items():
            for match in pattern.finditer(text):
                term = " ".join(match.group().split()).casefold()
                yield _finding(check, f"{_TERM_LABELS[check]} '{term}'")

    def _personal_data_findings(self, text: str) -> Iterator[Finding]:
        for match in _EMAIL.finditer(text):
            local, domain = match.groups()
            yield _finding(Check.PERSONAL_DATA, f"email address '{local[0]}***@{domain}'")
        for region in self.config.phone_regions:
            for match in phonenumbers.PhoneNumberMatcher(text, region):
                yield _finding(
                    Check.PERSONAL_DATA, f"phone number '{_mask_digits(match.raw_string)}'"
                )

    def _link_findings(self, text: str) -> Iterator[Finding]:
        for match in self._link.finditer(text):
            link = match.group().rstrip(_LINK_TRAILING)
            try:
                host = urlsplit(link if "://" in link else f"http://{link}").hostname
            except ValueError:  # e.g. a broken IPv6 literal: no domain to vouch for
                host = None
            if not host:
                yield _finding(Check.UNKNOWN_LINK, f"link without a readable domain '{link}'")
                continue
            host = host.rstrip(".")
            allowed = any(host == d or host.endswith(f".{d}") for d in self.config.allowed_domains)
            if not allowed:
                yield _finding(Check.UNKNOWN_LINK, f"link to unknown domain '{host}'")

    def _duplicate_findings(self, text: str) -> Iterator[Finding]:
        shingles = _shingles(text)
        if not shingles:
            return
        # LSH only proposes candidates; the exact Jaccard of the shingle sets decides and is
        # the similarity reported, so a finding never rests on a MinHash estimate.
        similar: list[tuple[float, str]] = []
        for key in self._lsh.query(self._sketch(shingles)):
            published = self._published[key]
            other = _shingles(published)
            jaccard = len(shingles & other) / len(shingles | other)
            if jaccard >= self.config.duplicate_threshold:
                similar.append((jaccard, published))
        similar.sort(key=lambda pair: pair[0], reverse=True)
        for jaccard, published in similar[:MAX_DUPLICATE_FINDINGS]:
            yield _finding(
                Check.NEAR_DUPLICATE,
                f"near-duplicate (Jaccard {jaccard:.2f}) of published '{_excerpt(published)}'",
            )

    def _sketch(self, shingles: set[str]) -> MinHash:
        minhash = self._minhash.copy()
        minhash.update_batch([shingle.encode("utf-8") for shingle in shingles])
        return minhash

    def _length_findings(self, text: str, kind: TextKind) -> Iterator[Finding]:
        limit = self.config.max_length[kind]
        if len(text) > limit:
            yield _finding(
                Check.LENGTH, f"{kind} has {len(text)} characters, over the limit of {limit}"
            )


def _finding(check: Check, detail: str) -> Finding:
    return Finding(check=check, severity=CHECK_SEVERITY[check], detail=detail)


def _term_pattern(terms: Iterable[str]) -> re.Pattern[str]:
    """One alternation of whole-word terms, longest first, any whitespace inside phrases.

    The lookarounds make "ass" miss "class" and "bass" while matching "kick-ass"; an empty list
    compiles to a pattern that never matches.
    """
    phrases = sorted({" ".join(term.split()) for term in terms}, key=len, reverse=True)
    alternatives = [r"\s+".join(re.escape(word) for word in phrase.split()) for phrase in phrases]
    body = "|".join(alternatives) or r"(?!)"
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def _link_pattern(bare_tlds: tuple[str, ...]) -> re.Pattern[str]:
    """Links with a scheme or `www.`, plus bare `name.tld[/path]` for the listed top-level domains.

    A bare name needs a listed, lower-case TLD because `v1.2.3`, `e.g.` and `script.py` look
    like domains too, and "great video.Be sure to subscribe" lacks only a space. It must not
    follow `@` (an email's domain) or a word character, dot or slash (`a.b.example` is matched
    from its start).
    """
    links = [r"\bhttps?://[^\s<>\"']+", r"\bwww\.[^\s<>\"']+"]
    if bare_tlds:
        tlds = "|".join(re.escape(tld) for tld in sorted(set(bare_tlds), key=len, reverse=True))
        label = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
        links.append(rf"(?<![\w.@/-])(?:{label}\.)+(?-i:{tlds})(?![\w-]|\.\w)(?:/[^\s<>\"']*)?")
    return re.compile("|".join(links), re.IGNORECASE)


def _shingles(text: str) -> set[str]:
    """Character 5-grams of the text lower-cased, NFKC-folded, punctuation turned into spaces.

    Characters rather than words because titles are short: a 9-word title has only 7 word
    trigrams and one edited word removes three of them, while its ~50 character 5-grams lose
    about five per edited word, so Jaccard stays meaningful for titles and long scripts alike.
    Normalising first makes "Official Video!!" and "official video" the same text.
    """
    normal = _NON_ALPHANUMERIC.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    if len(normal) <= SHINGLE_SIZE:
        return {normal} if normal else set()
    return {normal[i : i + SHINGLE_SIZE] for i in range(len(normal) - SHINGLE_SIZE + 1)}


def _mask_digits(number: str) -> str:
    """All digits but the last two as `*`, so the finding locates the number without leaking it."""
    return _MASKED_DIGIT.sub("*", number)


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT_LENGTH else f"{flat[: EXCERPT_LENGTH - 1]}…"
