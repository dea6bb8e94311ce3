"""Policy-check tests: each check fires on what it is for and stays quiet on near misses."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from contentml.errors import UserError
from tests.conftest import DATA_DIR
from training.quality.policy import (
    CHECK_SEVERITY,
    DEFAULT_POLICY,
    Check,
    Finding,
    PolicyChecker,
    PolicyConfig,
    PolicyError,
    Severity,
    TextKind,
    load_policy,
)

SCRIPT = (
    "Today we are building a raised garden bed from reclaimed pallet wood. First, pull the "
    "pallets apart with a pry bar and a hammer, and sort the boards by length. Sand every board "
    "so nobody gets a splinter, then cut four corner posts from the thickest pieces. Screw the "
    "long boards to the posts to make the sides, check that the frame is square, and line the "
    "inside with cardboard so the weeds cannot come through. Fill it with compost and topsoil, "
    "water it well, and plant your tomatoes about half a metre apart."
)
PUBLISHED = (
    "Taylor Swift - Look What You Made Me Do",
    "10 Kitchen Gadgets put to the Test - part 15",
    "How to Fix a Leaky Faucet in 5 Minutes",
    "Marvel Studios' Avengers: Infinity War Official Trailer",
    SCRIPT,
)
"""The published corpus the near-duplicate tests compare against."""


def findings_of(findings: list[Finding], check: Check) -> list[Finding]:
    return [finding for finding in findings if finding.check == check]


@pytest.fixture(scope="module")
def policy() -> PolicyConfig:
    # The shipped policy, plus "ass" to show whole-word matching on the classic near miss.
    shipped = load_policy()
    return replace(shipped, banned_terms=(*shipped.banned_terms, "ass"))


@pytest.fixture(scope="module")
def checker(policy: PolicyConfig) -> PolicyChecker:
    return PolicyChecker(policy, PUBLISHED)


def test_shipped_policy_loads_with_youtube_limits() -> None:
    policy = load_policy(DEFAULT_POLICY)
    assert policy.max_length == {
        TextKind.SCRIPT: 20000,
        TextKind.TITLE: 100,
        TextKind.DESCRIPTION: 5000,
    }
    assert policy.banned_terms and policy.brand_safety_terms
    assert {"youtube.com", "contentml.example"} <= set(policy.allowed_domains)
    assert 0 < policy.duplicate_threshold <= 1


def test_every_check_has_a_severity_and_its_public_name() -> None:
    assert set(CHECK_SEVERITY) == set(Check)
    assert [check.value for check in Check] == [
        "banned_term",
        "brand_safety",
        "personal_data",
        "unknown_link",
        "near_duplicate",
        "length",
    ]
    assert issubclass(PolicyError, UserError)


# --- terms ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "check", "severity", "term"),
    [
        ("What the FUCK is this", Check.BANNED_TERM, Severity.REJECT, "fuck"),
        ("kick-ass trailer", Check.BANNED_TERM, Severity.REJECT, "ass"),
        ("Guns   for\nSale near you", Check.BRAND_SAFETY, Severity.REVIEW, "guns for sale"),
        ("Vegas CASINO night", Check.BRAND_SAFETY, Severity.REVIEW, "casino"),
        ("breaking: meth lab found", Check.BRAND_SAFETY, Severity.REVIEW, "meth"),
    ],
)
def test_terms_fire_and_name_the_term(
    checker: PolicyChecker, text: str, check: Check, severity: Severity, term: str
) -> None:
    fired = findings_of(checker.check(text, TextKind.TITLE), check)
    assert fired == [Finding(check, severity, fired[0].detail)]
    assert f"'{term}'" in fired[0].detail


@pytest.mark.parametrize(
    "text",
    [
        "A classic bass solo in music class",
        "The scientific method, explained",
        "Gorgeous heroine of the story",
        "Passholders guide to the park",
        "Shitake mushrooms are not shiitake",
    ],
)
def test_terms_match_whole_words_only(checker: PolicyChecker, text: str) -> None:
    findings = checker.check(text, TextKind.TITLE)
    assert not findings_of(findings, Check.BANNED_TERM)
    assert not findings_of(findings, Check.BRAND_SAFETY)


def test_a_repeated_term_is_one_finding(checker: PolicyChecker) -> None:
    findings = checker.check("casino casino CASINO", TextKind.TITLE)
    assert len(findings_of(findings, Check.BRAND_SAFETY)) == 1


# --- personal data ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret", "masked"),
    [
        ("Write to jane.doe@example.com today", "jane.doe", "j***@example.com"),
        ("Call (650) 253-0000 for a quote", "650", "(***) ***-**00"),
        ("UK office: +44 20 7946 0958.", "7946", "+** ** **** **58"),
        ("UK office: 020 7946 0958", "7946", "*** **** **58"),
    ],
)
def test_personal_data_is_rejected_and_masked(
    checker: PolicyChecker, text: str, secret: str, masked: str
) -> None:
    fired = findings_of(checker.check(text, TextKind.DESCRIPTION), Check.PERSONAL_DATA)
    assert len(fired) == 1
    assert fired[0].severity == Severity.REJECT
    assert masked in fired[0].detail
    assert secret not in fired[0].detail


@pytest.mark.parametrize(
    "text",
    [
        "Release v1.2.3 is out",
        "Now only $1,299.99 (was 1499.99)",
        "Top 10 of 2018",
        "Recorded 2017-11-14 at 12:30",
        "ISBN 978-3-16-148410-0",
        "Follow @contentml on every platform",
        "4K 1080p60 HDR 5 000 000 views",
    ],
)
def test_numbers_and_handles_are_not_personal_data(checker: PolicyChecker, text: str) -> None:
    assert not findings_of(checker.check(text, TextKind.DESCRIPTION), Check.PERSONAL_DATA)


# --- links ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "domain"),
    [
        ("Full guide: https://evil.example.net/x?y=1", "evil.example.net"),
        ("more at www.shady.org.", "www.shady.org"),
        ("Deals on shady.io/deal, hurry", "shady.io"),
        ("http://youtube.com.evil.net/watch", "youtube.com.evil.net"),
        ("https://notyoutube.com/", "notyoutube.com"),
        ("http://user@evil.net:8080/path", "evil.net"),
        ("our shop: Shop.Example.co.uk/deal", "shop.example.co.uk"),
    ],
)
def test_links_to_unknown_domains_go_to_review(
    checker: PolicyChecker, text: str, domain: str
) -> None:
    fired = findings_of(checker.check(text, TextKind.DESCRIPTION), Check.UNKNOWN_LINK)
    assert fired == [
        Finding(Check.UNKNOWN_LINK, Severity.REVIEW, f"link to unknown domain '{domain}'")
    ]


@pytest.mark.parametrize(
    "text",
    [
        "Watch on https://m.youtube.com/watch?v=abc123",
        "Short link: youtu.be/abc123",
        "WWW.YouTube.com/channel/xyz",
        "Follow us on instagram.com/contentml.",
        "Merch at https://shop.contentml.example/merch",
        "Built with node.js and script.py, e.g. v1.2.3 in the U.S.",
        "great video.Be sure to subscribe",
        "Questions? jane@shady.org",
    ],
)
def test_allowed_links_and_lookalikes_are_not_flagged(checker: PolicyChecker, text: str) -> None:
    assert not findings_of(checker.check(text, TextKind.DESCRIPTION), Check.UNKNOWN_LINK)


# --- near-duplicates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "published"),
    [
        ("taylor swift: look what you made me do NOW!", PUBLISHED[0]),
        ("10 Kitchen Gadgets Put To The Test - Part 18", PUBLISHED[1]),
        ("How to fix a leaky faucet in 10 minutes", PUBLISHED[2]),
        (
            SCRIPT.replace("tomatoes", "peppers").replace("Today we are", "This week I am"),
            PUBLISHED[4],
        ),
    ],
)
def test_lightly_edited_copies_are_near_duplicates(
    checker: PolicyChecker, policy: PolicyConfig, text: str, published: str
) -> None:
    fired = findings_of(checker.check(text, TextKind.SCRIPT), Check.NEAR_DUPLICATE)
    assert len(fired) == 1
    assert fired[0].severity == Severity.REVIEW
    assert published[:40] in fired[0].detail
    jaccard = float(re.search(r"Jaccard (\d\.\d\d)", fired[0].detail).group(1))
    assert policy.duplicate_threshold <= jaccard < 1


@pytest.mark.parametrize(
    "text",
    [
        "Taylor Swift live at Wembley: the full concert",
        "10 camping hacks you need to try",
        "Building a raised bed? Here is why cedar beats pallet wood.",
        "",
    ],
)
def test_different_texts_are_not_near_duplicates(checker: PolicyChecker, text: str) -> None:
    assert not findings_of(checker.check(text, TextKind.TITLE), Check.NEAR_DUPLICATE)


@pytest.mark.parametrize(
    "text",
    [
        "How to Fix a Leaky Faucet",  # Jaccard 0.62
        "Taylor Swift - Look What You Made Me Do (Official Video)",  # 0.69
        "Avengers: Infinity War Official Trailer",  # 0.69
    ],
)
def test_lsh_candidates_under_the_threshold_are_not_reported(
    checker: PolicyChecker, text: str
) -> None:
    # With the shipped threshold (0.7) and num_perm the LSH proposes each of these, so only the
    # exact Jaccard of the shingle sets keeps them out of the findings.
    assert not findings_of(checker.check(text, TextKind.TITLE), Check.NEAR_DUPLICATE)


def test_a_stricter_threshold_reports_fewer_copies(policy: PolicyConfig) -> None:
    strict = PolicyChecker(replace(policy, duplicate_threshold=0.95), PUBLISHED)
    edited = "How to fix a leaky faucet in 10 minutes"
    assert not findings_of(strict.check(edited, TextKind.TITLE), Check.NEAR_DUPLICATE)
    assert findings_of(strict.check(PUBLISHED[2].upper(), TextKind.TITLE), Check.NEAR_DUPLICATE)


def test_repeated_published_texts_give_one_finding(policy: PolicyConfig) -> None:
    checker = PolicyChecker(policy, [PUBLISHED[0]] * 5)
    fired = findings_of(checker.check(PUBLISHED[0], TextKind.TITLE), Check.NEAR_DUPLICATE)
    assert [finding.detail for finding in fired] == [
        f"near-duplicate (Jaccard 1.00) of published '{PUBLISHED[0]}'"
    ]


def test_real_trending_titles_index_and_check_fast(policy: PolicyConfig) -> None:
    path = DATA_DIR / "youtube-trending" / "USvideos.csv"
    if not path.is_file():
        pytest.skip(f"{path} is missing: the shared YouTube trending data is not mounted")
    titles = pd.read_csv(path)["title"].dropna().tolist()
    start = time.perf_counter()
    checker = PolicyChecker(policy, titles)
    assert time.perf_counter() - start < 10.0

    edited = titles[0].upper() + "!"
    fired = findings_of(checker.check(edited, TextKind.TITLE), Check.NEAR_DUPLICATE)
    assert any(titles[0][:20] in finding.detail for finding in fired)
    unrelated = "Quarterly tax tips for freelance woodworkers in Lisbon"
    assert not findings_of(checker.check(unrelated, TextKind.TITLE), Check.NEAR_DUPLICATE)

    sample = titles[:500]
    start = time.perf_counter()
    for title in sample:
        checker.check(title, TextKind.TITLE)
    assert (time.perf_counter() - start) / len(sample) < 0.05


# --- length -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "limit"),
    [(TextKind.TITLE, 100), (TextKind.DESCRIPTION, 5000), (TextKind.SCRIPT, 20000)],
)
def test_length_limit_per_kind(checker: PolicyChecker, kind: TextKind, limit: int) -> None:
    assert not findings_of(checker.check("x" * limit, kind), Check.LENGTH)
    fired = findings_of(checker.check("x" * (limit + 1), kind), Check.LENGTH)
    assert len(fired) == 1
    assert fired[0].severity == Severity.REJECT
    assert f"limit of {limit}" in fired[0].detail


def test_clean_text_passes(checker: PolicyChecker) -> None:
    assert checker.check("Five easy weeknight dinners", TextKind.TITLE) == []


# --- bad policy files -------------------------------------------------------------------------


def write_policy(tmp_path: Path, **changes: Any) -> Path:
    """The shipped policy with `changes` applied (a value of None removes the field)."""
    raw = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    for name, value in changes.items():
        if value is None:
            del raw[name]
        else:
            raw[name] = value
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"duplicate_threshold": 1.5}, "duplicate_threshold must be in (0, 1], got 1.5"),
        ({"duplicate_threshold": -0.1}, "duplicate_threshold must be in (0, 1], got -0.1"),
        ({"duplicate_threshold": "high"}, "duplicate_threshold must be a number"),
        ({"banned_terms": "fuck"}, "banned_terms must be a list of non-empty strings"),
        ({"allowed_domains": ["youtube.com", 7]}, "allowed_domains must be a list"),
        ({"num_perm": 1}, "num_perm must be at least 2"),
        ({"phone_regions": ["US", "XX"]}, "phone_regions has unknown region codes ['XX']"),
        ({"max_length": {"title": 100}}, "max_length has no limit for ['script', 'description']"),
        ({"max_length": {"thumbnail": 1}}, "max_length: 'thumbnail' is not a valid TextKind"),
        ({"max_length": [100]}, "max_length must map each text kind to a limit"),
        ({"num_perm": None}, "missing fields ['num_perm']"),
        ({"extra": 1}, "unknown fields ['extra']"),
    ],
)
def test_bad_policy_fields_name_file_and_field(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = write_policy(tmp_path, **changes)
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "policy file not found"),
        ("banned_terms: [fuck\n", "not readable YAML"),
        ("- just\n- a list\n", "must be a mapping of policy fields, got list"),
        ("", "must be a mapping of policy fields, got NoneType"),
    ],
)
def test_unreadable_policy_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "policy.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(PolicyError, match=re.escape(message)) as raised:
        load_policy(path)
    assert str(path) in str(raised.value)
