"""The reward store on both backends: SQLite (embedded) and the real PostgreSQL (cluster).
Experiments are created once, bad rewards store nothing, and a second store on the same
database (a restarted server, another replica) sees exactly the same experiment."""

from __future__ import annotations

import math
import uuid

import pytest

from training.revenue.experiment import Metric, Policy
from training.revenue.store import (
    MAX_REWARD,
    ExperimentError,
    RewardStore,
    UnknownExperiment,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'revenue.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(url):
    store = RewardStore(url)
    yield store
    store.close()


def name() -> str:
    return f"thumb-{uuid.uuid4().hex[:8]}"


def test_an_experiment_is_created_once_with_its_arms(store):
    experiment = name()
    made = store.ensure(experiment, ["a", "b", "c"])
    assert (made.metric, made.policy, made.arms) == (Metric.CTR, Policy.THOMPSON, ("a", "b", "c"))
    # Any order of the same arms is the same experiment; metric and policy are kept.
    again = store.ensure(experiment, ["c", "a", "b"])
    assert again.arms == ("a", "b", "c") and again.created_at == made.created_at
    assert [s.impressions for s in store.stats(experiment)] == [0, 0, 0]


@pytest.mark.parametrize(
    ("arms", "metric", "policy", "problem"),
    [
        (["a", "b", "d"], None, None, "has arms ['a', 'b', 'c'], not ['a', 'b', 'd']"),
        (["a", "b", "c"], Metric.RPM, None, "uses ctr, not rpm"),
        (["a", "b", "c"], None, Policy.EVEN, "uses thompson, not even"),
        (["a"], None, None, "a list of 2 to 100 names"),
        (["a", "a"], None, None, "must be distinct"),
        (["a", "b c"], None, None, "an arm must be letters"),
        ("ab", None, None, "a list of 2 to 100 names"),
    ],
)
def test_a_request_that_does_not_match_is_refused(store, arms, metric, policy, problem):
    experiment = name()
    store.ensure(experiment, ["a", "b", "c"])
    with pytest.raises(ExperimentError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        store.ensure(experiment, arms, metric, policy)


def test_rewards_update_the_totals_and_the_history(store):
    experiment = name()
    store.ensure(experiment, ["a", "b"], Metric.WATCH_TIME)
    for arm in ["a", "a", "b"]:
        store.record_impression(experiment, arm)
    assert store.add_rewards(experiment, [("a", 30.0), ("a", 50), ("b", 12.5)]) == 3
    a, b = store.stats(experiment)
    assert (a.impressions, a.rewards, a.reward_sum, a.reward_square_sum) == (2, 2, 80.0, 3400.0)
    assert (b.impressions, b.rewards, b.mean) == (1, 1, 12.5)
    history = store.history(experiment)
    assert list(history["arm"]) == ["a", "a", "b"]
    assert list(history["reward"]) == [30.0, 50.0, 12.5]
    # The totals are the stored rewards' sums.
    assert store.rebuild(experiment) == [a, b]


@pytest.mark.parametrize(
    ("outcomes", "problem"),
    [
        ([("a", 1.0), ("z", 1.0)], "has no arm 'z'"),
        ([("a", 1.0), ("b", math.nan)], "finite number, not nan"),
        ([("a", 1.0), ("b", math.inf)], "finite number, not inf"),
        ([("a", "1")], "finite number, not '1'"),
        ([("a", True)], "finite number, not True"),
        ([("a", None)], "finite number, not None"),
        ([("a", 1.5)], r"rates in \[0, 1\]"),
        ([("a", -0.1)], r"rates in \[0, 1\]"),
        ([], "no rewards given"),
    ],
)
def test_a_bad_reward_stores_nothing_of_its_batch(store, outcomes, problem):
    experiment = name()
    store.ensure(experiment, ["a", "b"])
    store.add_rewards(experiment, [("a", 1.0)])
    before = store.stats(experiment)
    with pytest.raises(ExperimentError, match=problem):
        store.add_rewards(experiment, outcomes)
    assert store.stats(experiment) == before
    assert len(store.history(experiment)) == 1


@pytest.mark.parametrize(
    "reward",
    [1e200, -1e200, 10**400, MAX_REWARD * 1.000001],
    ids=["1e200", "-1e200", "10**400", "just-over"],
)
def test_a_reward_beyond_the_bound_stores_nothing_and_the_experiment_still_answers(store, reward):
    """Its square would overflow the totals to infinity: every later choice and report fails."""
    experiment = name()
    store.ensure(experiment, ["a", "b"], Metric.REVENUE)
    store.add_rewards(experiment, [("a", MAX_REWARD), ("b", -MAX_REWARD)])
    before = store.stats(experiment)
    with pytest.raises(ExperimentError, match=r"reward for arm 'b' must be within \+-1e\+09"):
        store.add_rewards(experiment, [("a", 2.0), ("b", reward)])
    assert store.stats(experiment) == before
    assert all(math.isfinite(s.reward_square_sum) for s in before)
    assert len(store.history(experiment)) == 2


def test_unknown_experiments_and_bad_names(store):
    with pytest.raises(UnknownExperiment, match="no experiment 'ghost'"):
        store.add_rewards("ghost", [("a", 1.0)])
    with pytest.raises(UnknownExperiment):
        store.stats("ghost")
    with pytest.raises(ExperimentError, match="experiment must be letters"):
        store.ensure("bad name!", ["a", "b"])
    with pytest.raises(ExperimentError, match="at most 200"):
        store.ensure("x" * 201, ["a", "b"])


def test_a_second_store_on_the_same_database_sees_the_same_experiment(url):
    """A restarted server, or another replica: the same counts, and it continues them."""
    experiment = name()
    first = RewardStore(url)
    first.ensure(experiment, ["a", "b"])
    first.record_impression(experiment, "a")
    first.add_rewards(experiment, [("a", 1.0), ("a", 0.0)])
    before = first.stats(experiment)
    first.close()
    second = RewardStore(url)
    assert second.stats(experiment) == before
    assert second.ensure(experiment, ["b", "a"]).arms == ("a", "b")
    second.add_rewards(experiment, [("b", 1.0)])
    third = RewardStore(url)  # a replica running beside it
    assert [s.rewards for s in third.stats(experiment)] == [2, 1]
    assert experiment in [e.name for e in third.all()]
    second.close()
    third.close()
