"""The simulator's inputs and outputs: category engagement rates from the real trending data,
a clear error for a malformed file, and rewards that match the rates they are drawn from."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.conftest import DATA_DIR
from training.data import DataError
from training.revenue.experiment import Policy
from training.revenue.simulator import (
    Simulator,
    WatchTimeSimulator,
    category_rates,
    run_bandit,
)


@pytest.fixture(scope="module")
def rates() -> dict[str, float]:
    return category_rates(DATA_DIR)


def test_category_rates_from_the_real_data(rates):
    assert len(rates) >= 8
    assert all(0 < rate < 1 for rate in rates.values())
    assert list(rates.values()) == sorted(rates.values(), reverse=True)
    # Names come from the category file, not ids; and the categories really differ.
    assert "Music" in rates and "Entertainment" in rates
    assert max(rates.values()) > 2 * min(rates.values())


def test_a_malformed_trending_file_is_named(tmp_path):
    trending = tmp_path / "youtube-trending"
    trending.mkdir()
    source = DATA_DIR / "youtube-trending"
    for name in ("GBvideos.csv", "US_category_id.json"):
        shutil.copy(source / name, trending / name)
    (trending / "USvideos.csv").write_text("video_id,title,views\nabcdefghijk,x,10\n")
    with pytest.raises(DataError, match=r"USvideos\.csv: missing columns .*likes"):
        category_rates(tmp_path)


@pytest.mark.parametrize("rate", [0.0, 0.03, 0.5])
def test_the_click_rate_matches_the_arm_rate(rate):
    simulator = Simulator({"a": rate, "b": 0.9}, np.random.default_rng(0))
    clicks = simulator.rewards(np.zeros(200_000, dtype=int))
    assert set(np.unique(clicks)) <= {0.0, 1.0}
    assert clicks.mean() == pytest.approx(rate, abs=4 * np.sqrt(rate * (1 - rate) / 200_000) + 1e-9)
    assert simulator.reward("b") in (0.0, 1.0)


def test_watch_seconds_have_the_arm_mean():
    simulator = WatchTimeSimulator({"a": 30.0, "b": 90.0}, np.random.default_rng(0))
    seconds = simulator.rewards(np.ones(200_000, dtype=int))
    assert (seconds > 0).all()
    assert seconds.mean() == pytest.approx(90.0, rel=0.02)


def test_bad_simulator_arms_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Simulator({"a": 1.5}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="positive"):
        WatchTimeSimulator({"a": 0.0}, np.random.default_rng(0))


def test_run_bandit_accounts_for_every_impression():
    result = run_bandit(
        Policy.EVEN,
        Simulator({"a": 0.02, "b": 0.05}, np.random.default_rng(0)),
        1_001,
        np.random.default_rng(1),
        delay=100,
    )
    assert result.impressions == 1_001 and sum(result.counts.values()) == 1_001
    assert result.best_arm == "b"
    chose_a = result.counts["a"]
    assert result.cumulative_regret == pytest.approx(chose_a * 0.03)
    assert np.all(np.diff(result.regret) >= 0)
    summary = result.summary()
    assert summary["policy"] == "even" and 0 <= summary["best_arm_share_last_quarter"] <= 1
