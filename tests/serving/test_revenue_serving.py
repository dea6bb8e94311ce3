"""`revenue` on a real model server: a client that hides the arms' click rates asks for an arm
per impression and posts what it earned; the bandit moves the traffic to the best arm, survives
a restart, refuses bad input without storing it, and the report names the winner."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest

from entrypoints.demo import free_port, model_server
from tests.conftest import make_settings, run_cli

RATES = {"calm": 0.10, "bold": 0.30, "plain": 0.18}
"""Hidden click rates of three thumbnails; `bold` is the best."""
BATCH = 50
"""Rewards come back in batches (delayed feedback), as the content pipeline reports them."""


def impressions(url: str, experiment: str, count: int, rng: np.random.Generator) -> list[str]:
    """`count` impressions: choose, show, report clicks every BATCH; returns the arms shown."""
    shown, pending = [], []
    with httpx.Client(base_url=url, timeout=10.0) as client:
        for _ in range(count):
            answer = client.post(
                "/v1/models/revenue:predict",
                json={"instances": [{"experiment": experiment, "arms": list(RATES)}]},
            )
            assert answer.status_code == 200, answer.text
            (prediction,) = answer.json()["predictions"]
            assert math.isclose(sum(prediction["probabilities"].values()), 1.0, abs_tol=1e-6)
            arm = prediction["arm"]
            shown.append(arm)
            pending.append({"arm": arm, "reward": float(rng.random() < RATES[arm])})
            if len(pending) == BATCH:
                stored = client.post(f"/v1/experiments/{experiment}/rewards", json=pending)
                assert stored.json() == {"experiment": experiment, "stored": BATCH}
                pending = []
    return shown


def report(home, experiment: str) -> dict:
    done = run_cli(home, "experiments", "report", experiment, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("revenue") / "state"


@pytest.mark.slow
def test_the_bandit_finds_the_best_arm_and_survives_a_restart(home, tmp_path):
    settings = make_settings(home)
    rng = np.random.default_rng(7)
    port = free_port()
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with model_server(settings, port, "--models", "revenue", log=logs[0]) as url:
        first = impressions(url, "thumbs", 1_000, rng)
    # Killed and started again mid-experiment: the store holds every choice and reward.
    before = report(home, "thumbs")
    assert sum(a["impressions"] for a in before["arms"]) == 1_000
    assert sum(a["rewards"] for a in before["arms"]) == 1_000
    # Restarted with its access log on (off by default): a line per request.
    logged = make_settings(home, CONTENTML_ACCESS_LOG="true")
    with model_server(logged, port, "--models", "revenue", log=logs[1]) as url:
        assert report(home, "thumbs")["arms"] == before["arms"]
        second = impressions(url, "thumbs", 1_000, rng)
        page = httpx.get(f"{url}/v1/experiments/thumbs/report.html", timeout=30.0)
    access_lines = [log.read_text().count("POST /v1/models/revenue%3Apredict") for log in logs]
    assert access_lines == [0, 1_000]
    shown = first + second
    last = shown[-500:]
    assert last.count("bold") / len(last) >= 0.8
    best = max(RATES.values())
    regret = sum(best - RATES[arm] for arm in shown)
    even = len(shown) * (best - sum(RATES.values()) / len(RATES))
    assert regret <= 0.3 * even, (regret, even)

    final = report(home, "thumbs")
    assert final["best_arm"] == "bold"
    (bold,) = [a for a in final["arms"] if a["arm"] == "bold"]
    # P(best) after a fixed number of unseeded draws is itself random: it crossed 0.95 in most
    # runs and was 0.946 in one, so the check is that the posterior clearly favours the best
    # arm (a broken bandit leaves it near 1/3), not the stop rule's threshold.
    assert bold["probability_best"] >= 0.9
    # The bandit's draws are not seeded: a check that fails 5 % of runs (the interval missing
    # the rate) would be a flaky test, so the estimate is held to 4 standard errors instead.
    assert bold["ci_low"] < bold["mean"] < bold["ci_high"]
    assert abs(bold["mean"] - RATES["bold"]) < 0.05
    # Whether these figures already pass the stop rule (p >= 0.95 and a small expected loss:
    # tested on fixed figures in test_revenue_policies) is as random as P(best); either way the
    # recommendation is about the best arm.
    assert final["recommendation"].startswith(("stop: bold is best", "continue: bold leads"))
    assert page.status_code == 200 and all(arm in page.text for arm in RATES)


@pytest.fixture(scope="module")
def server(home):
    with model_server(make_settings(home), free_port(), "--models", "revenue") as url:
        yield url


def counts(url: str, experiment: str) -> list[tuple[int, int]]:
    found = httpx.get(f"{url}/v1/experiments/{experiment}", timeout=10.0).json()
    return [(a["impressions"], a["rewards"]) for a in found["arms"]]


def started_counts(url: str, experiment: str) -> list[tuple[int, int]]:
    """`counts` of `experiment` after one choice of its arms `a` and `b` (which creates it)."""
    httpx.post(
        f"{url}/v1/models/revenue:predict",
        json={"instances": [{"experiment": experiment, "arms": ["a", "b"]}]},
        timeout=10.0,
    )
    return counts(url, experiment)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"instances": [{"experiment": "e2", "arms": ["a"]}]}, "2 to 100 names"),
        ({"instances": [{"experiment": "e2", "arms": ["a", "a"]}]}, "distinct"),
        ({"instances": [{"experiment": "e2 x", "arms": ["a", "b"]}]}, "may only hold letters"),
        ({"instances": [{"experiment": "e2..x", "arms": ["a", "b"]}]}, "contains '..'"),
        ({"instances": [{"experiment": 2, "arms": ["a", "b"]}]}, "must be text, not int"),
        ({"instances": [{"experiment": "e2"}]}, "needs 'experiment' and 'arms'"),
        ({"instances": [{"experiment": "e2", "arms": ["a", "b"], "metric": "likes"}]}, "ctr"),
        ({"instances": [{"experiment": "e2", "arms": ["a", "b"], "colour": 1}]}, "unknown keys"),
        ({"instances": []}, "1 to 100 choices"),
        ({"inputs": []}, "1 to 100 choices"),
        # One bad instance after a good one: the good one is not answered or stored either.
        (
            {"instances": [{"experiment": "e3", "arms": ["a", "b"]}, {"experiment": "e3"}]},
            "instance 1",
        ),
        # A new experiment named twice with other arms (or metric) in one request (fuzzing).
        (
            {
                "instances": [
                    {"experiment": "e3", "arms": ["a", "b", "c"]},
                    {"experiment": "e2", "arms": ["x", "y"]},
                    {"experiment": "e3", "arms": ["b", "c"], "metric": "rpm"},
                ]
            },
            "instance 2: experiment 'e3' differs from instance 0's",
        ),
        (
            {
                "instances": [
                    {"experiment": "e3", "arms": ["a", "b"], "metric": "ctr"},
                    {"experiment": "e3", "arms": ["a", "b"], "metric": "rpm"},
                ]
            },
            "instance 1: experiment 'e3' differs",
        ),
    ],
)
def test_a_malformed_choice_gets_400_and_stores_nothing(server, payload, problem):
    answer = httpx.post(f"{server}/v1/models/revenue:predict", json=payload, timeout=10.0)
    assert answer.status_code == 400 and problem in answer.text
    listed = httpx.get(f"{server}/v1/experiments", timeout=10.0).json()["experiments"]
    assert not {"e2", "e3"} & {e["name"] for e in listed}


@pytest.mark.parametrize(
    ("body", "status", "problem"),
    [
        ('{"arm": "z", "reward": 1}', 400, "has no arm 'z'"),
        ('{"arm": "a", "reward": NaN}', 400, "finite number, not nan"),
        ('{"arm": "a", "reward": "1"}', 400, "finite number"),
        ('{"arm": "a", "reward": 2}', 400, "rates in [0, 1]"),
        ('[{"arm": "a", "reward": 1}, {"arm": "b"}]', 400, "reward 1"),
        ('[{"arm": "a", "reward": 1}, {"arm": "b", "reward": -1}]', 400, "rates in [0, 1]"),
        ("[]", 400, "1 to 10000 rewards"),
        ("not json", 400, "not JSON"),
    ],
)
def test_a_malformed_reward_gets_400_and_stores_nothing(server, body, status, problem):
    before = started_counts(server, "r1")
    answer = httpx.post(
        f"{server}/v1/experiments/r1/rewards",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10.0,
    )
    assert answer.status_code == status and problem in answer.json()["error"]
    assert counts(server, "r1") == before


@pytest.mark.parametrize("reward", ["1e200", "-1e200", "1" + "0" * 400])
def test_a_reward_beyond_the_bound_gets_400_and_the_experiment_still_answers(server, reward):
    """Its square would make the stored totals infinite: every later choice and report of the
    experiment would fail."""
    choose = {"instances": [{"experiment": "big1", "arms": ["a", "b"], "metric": "revenue"}]}
    predict = f"{server}/v1/models/revenue:predict"
    assert httpx.post(predict, json=choose, timeout=10.0).status_code == 200
    before = counts(server, "big1")
    answer = httpx.post(
        f"{server}/v1/experiments/big1/rewards",
        content=f'[{{"arm": "a", "reward": 2.5}}, {{"arm": "b", "reward": {reward}}}]',
        headers={"content-type": "application/json"},
        timeout=10.0,
    )
    assert answer.status_code == 400 and "must be within +-1e+09" in answer.json()["error"]
    assert counts(server, "big1") == before
    assert httpx.post(predict, json=choose, timeout=10.0).status_code == 200
    assert httpx.get(f"{server}/v1/experiments/big1", timeout=10.0).status_code == 200


DEEP = 5_000
"""Levels of nesting: Python's json module (and `repr`) raise RecursionError past about 1,000,
KServe's orjson refuses past 1,024, and a parsed body of 1,000 levels still breaks repr."""


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/experiments/r1/rewards", b"[" * DEEP + b"]" * DEEP),
        ("/v1/experiments/r1/rewards", b'{"arm": "a", "reward": ' + b"[" * DEEP + b"}"),
        ("/v1/models/revenue:predict", b"[" * DEEP + b"]" * DEEP),
        (
            "/v1/models/revenue:predict",
            b'{"instances": [{"experiment": "r1", "arms": ' + b"[" * 900 + b"]" * 900 + b"}]}",
        ),
        ("/v1/channels/ch_a/metrics", b'{"views": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    ],
)
def test_a_body_nested_too_deep_gets_400_naming_the_problem(server, path, body):
    before = started_counts(server, "r1")
    answer = httpx.post(
        f"{server}{path}", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert answer.status_code == 400, answer.text
    assert "levels deep: at most 32 are taken" in answer.json()["error"]
    assert counts(server, "r1") == before


HOSTILE_NAMES = [
    # As sent in the path; the server decodes the escapes once.
    ("%2e%2e", "contains '..'"),
    ("a..b", "contains '..'"),
    ("..%2F..%2Fetc", "contains '..'"),
    ("a%2Fb", "contains a '/'"),
    ("a%5Cb", "contains a backslash"),
    ("a%00b", "contains a NUL byte"),
    ("a%252e%252e", "contains a '%'"),
    ("%20a", "may only hold letters, digits, '_', '-', '.' and ':'"),
    ("x" * 201, "longer than 200 characters"),
]


@pytest.mark.parametrize(("name", "problem"), HOSTILE_NAMES)
@pytest.mark.parametrize("route", ["GET {}", "GET {}/report.html", "POST {}/rewards"])
def test_a_hostile_experiment_name_gets_400_and_touches_nothing(server, route, name, problem):
    httpx.post(
        f"{server}/v1/models/revenue:predict",
        json={"instances": [{"experiment": "h1", "arms": ["a", "b"]}]},
        timeout=10.0,
    )
    before = httpx.get(f"{server}/v1/experiments", timeout=10.0).json()
    method, path = route.split()
    answer = httpx.request(
        method,
        f"{server}/v1/experiments/{path.format(name)}",
        json={"arm": "a", "reward": 1},
        timeout=10.0,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error.startswith("experiment name ") and problem in error, error
    assert httpx.get(f"{server}/v1/experiments", timeout=10.0).json() == before


def test_an_unknown_experiment_is_404(server):
    answer = httpx.post(
        f"{server}/v1/experiments/ghost/rewards", json={"arm": "a", "reward": 1}, timeout=10.0
    )
    assert answer.status_code == 404
    assert httpx.get(f"{server}/v1/experiments/ghost", timeout=10.0).status_code == 404


def test_the_cli_lists_experiments_and_refuses_an_unknown_one(home, server):
    listed = run_cli(home, "experiments", "list", "--json")
    assert listed.returncode == 0 and "r1" in {e["name"] for e in json.loads(listed.stdout)}
    missing = run_cli(home, "experiments", "report", "ghost", "--json")
    assert missing.returncode == 2 and "no experiment 'ghost'" in missing.stderr
