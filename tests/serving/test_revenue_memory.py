"""The bandit reads its posterior from memory, kept current from the shared store: its own
rewards are written through at once, another replica's arrive within the poll interval, and a
restart (a new predictor on the same store) continues from every stored impression and reward.
Two real predictors on one SQLite file, as two replicas share PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from contentml.settings import Settings
from serving.model_server.revenue import RevenueModel
from tests.conftest import make_settings, wait_until

POLL_SECONDS = 0.2
EXPERIMENT = "thumbs"
ARMS = ["bold", "plain"]


def choose(model: RevenueModel, count: int = 1) -> list[str]:
    instances = [{"experiment": EXPERIMENT, "arms": ARMS}] * count
    return [p["arm"] for p in model.predict_now({"instances": instances})["predictions"]]


def totals(model: RevenueModel) -> list[tuple[int, int, float]]:
    """Each arm's impressions, rewards and reward sum as the predictor holds them."""
    standing = model.standing(EXPERIMENT)
    assert standing is not None
    return [(s.impressions, s.rewards, s.reward_sum) for s in standing.stats]


def stored(model: RevenueModel) -> list[tuple[int, int, float]]:
    return [(s.impressions, s.rewards, s.reward_sum) for s in model.store.stats(EXPERIMENT)]


@pytest.fixture()
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path, CONTENTML_SERVING_POLL_SECONDS=str(POLL_SECONDS))


@pytest.fixture()
def replicas(settings: Settings) -> Iterator[tuple[RevenueModel, RevenueModel]]:
    first, second = RevenueModel("revenue", settings), RevenueModel("revenue", settings)
    first.load()
    second.load()
    yield first, second
    first.stop()
    second.stop()


def test_a_choice_reads_no_store(replicas: tuple[RevenueModel, RevenueModel]) -> None:
    first, _ = replicas
    choose(first)
    reads: list[list[str]] = []
    read = first.standings.read
    first.standings.read = lambda names: reads.append(list(names)) or read(names)
    first.refresher.stop()  # only the choices' own reads are counted
    choose(first, 20)
    assert reads == []
    assert totals(first) == stored(first)  # every impression written through, and stored


def test_a_reward_through_one_replica_reaches_the_other_within_the_interval(
    replicas: tuple[RevenueModel, RevenueModel],
) -> None:
    first, second = replicas
    (arm,) = choose(first)
    assert second.standing(EXPERIMENT) is not None  # the other replica reads it through
    first.add_rewards(EXPERIMENT, [(arm, 1.0), (arm, 1.0)])
    assert totals(first) == stored(first)  # written through: this replica sees it at once
    wait_until(
        lambda: totals(second) == stored(second),
        POLL_SECONDS + 2.0,  # one interval, plus a refresh's own time on a busy machine
        "the other replica's reward held by this one",
    )
    (arm,) = choose(second)
    wait_until(lambda: totals(first) == stored(first), POLL_SECONDS + 2.0, "its impression")


def test_a_restart_loses_nothing(settings: Settings) -> None:
    model = RevenueModel("revenue", settings)
    model.load()
    arms = choose(model, 5)
    model.add_rewards(EXPERIMENT, [(arms[0], 1.0)])
    before = totals(model)
    model.stop()
    restarted = RevenueModel("revenue", settings)
    restarted.load()
    try:
        assert totals(restarted) == before
        assert sum(impressions for impressions, _, _ in before) == 5
    finally:
        restarted.stop()
