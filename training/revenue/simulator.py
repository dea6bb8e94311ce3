"""Simulated experiments: arms whose true rates come from real YouTube engagement, rewards drawn
from them, and a bandit policy run against them with delayed feedback, scored by its regret."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contentml.errors import UserError
from training.data import DataError, load_youtube_trending
from training.revenue.experiment import Policy, RewardKind
from training.revenue.policies import Sums, choose_indices

MIN_VIDEOS_PER_CATEGORY = 20
"""Categories with fewer distinct trending videos are left out: their rate is mostly noise."""


def category_rates(data_dir: Path) -> dict[str, float]:
    """Engagement rate per YouTube category: (likes + comments) per view, from the trending data.

    Each video counts once per country, at its last snapshot (its counts are cumulative, and a
    video trending for ten days would otherwise count ten times); a category's rate is its
    videos' summed likes and comments over their summed views. Category names come from
    `US_category_id.json`. Sorted by rate, highest first. A missing or malformed file raises
    `DataError` naming the file (`training.data.load_youtube_trending` checks columns and values).
    """
    videos = load_youtube_trending(Path(data_dir))
    last = videos.sort_values("views").drop_duplicates(["country", "video_id"], keep="last")
    per_category = last.groupby("category").agg(
        videos=("video_id", "size"),
        engagements=("likes", "sum"),
        comments=("comment_total", "sum"),
        views=("views", "sum"),
    )
    per_category = per_category[
        (per_category["videos"] >= MIN_VIDEOS_PER_CATEGORY) & (per_category["views"] > 0)
    ]
    if per_category.empty:
        raise DataError(
            f"{data_dir}/youtube-trending: no category has {MIN_VIDEOS_PER_CATEGORY} videos "
            "with views"
        )
    rates = (per_category["engagements"] + per_category["comments"]) / per_category["views"]
    return {str(name): float(rate) for name, rate in rates.sort_values(ascending=False).items()}


class ArmSimulator:
    """Arms with known expected rewards; `rewards` draws what the chosen arms earn."""

    kind: RewardKind

    def __init__(self, means: dict[str, float], rng: np.random.Generator) -> None:
        if not means:
            raise UserError("a simulator needs at least one arm")
        self.arms = tuple(means)
        self.means = np.array([means[arm] for arm in self.arms], dtype=np.float64)
        """Each arm's expected reward, in the order of `arms`."""
        self.rng = rng

    def rewards(self, chosen: np.ndarray) -> np.ndarray:
        """One reward per chosen arm (indices into `arms`)."""
        raise NotImplementedError

    def reward(self, arm: str) -> float:
        return float(self.rewards(np.array([self.arms.index(arm)]))[0])


class Simulator(ArmSimulator):
    """Clicks: a chosen arm's reward is 1 with the arm's rate, else 0 (a CTR experiment)."""

    kind = RewardKind.RATE

    def __init__(self, rates: dict[str, float], rng: np.random.Generator) -> None:
        bad = {arm: rate for arm, rate in rates.items() if not 0 <= rate <= 1}
        if bad:
            raise UserError(f"click rates must lie in [0, 1], got {bad}")
        super().__init__(rates, rng)

    def rewards(self, chosen: np.ndarray) -> np.ndarray:
        return (self.rng.random(len(chosen)) < self.means[chosen]).astype(np.float64)


class WatchTimeSimulator(ArmSimulator):
    """Watch seconds: a chosen arm's reward is lognormal with the arm's mean (a continuous
    experiment); `sigma` is the log-scale spread, the same for every arm (1.0: a heavy right
    tail, the median ~60 % of the mean)."""

    kind = RewardKind.CONTINUOUS

    def __init__(
        self, mean_seconds: dict[str, float], rng: np.random.Generator, sigma: float = 1.0
    ) -> None:
        bad = {arm: mean for arm, mean in mean_seconds.items() if not mean > 0}
        if bad or not sigma > 0:
            raise UserError(f"mean seconds and sigma must be positive, got {bad}, sigma={sigma}")
        super().__init__(mean_seconds, rng)
        self.sigma = sigma

    def rewards(self, chosen: np.ndarray) -> np.ndarray:
        log_median = np.log(self.means[chosen]) - self.sigma**2 / 2
        return self.rng.lognormal(log_median, self.sigma)


@dataclass
class BanditResult:
    """One simulated experiment: what the policy chose and what it cost."""

    policy: Policy
    arms: tuple[str, ...]
    best_arm: str
    choices: np.ndarray
    """Index into `arms` of the arm chosen at each impression."""
    regret: np.ndarray
    """Cumulative (pseudo-)regret after each impression: sum of best mean - chosen arm's mean."""
    reward_sum: float
    seconds: float
    """Wall time of the policy's choices (reward simulation and bookkeeping excluded)."""
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        counts = np.bincount(self.choices, minlength=len(self.arms))
        self.counts = dict(zip(self.arms, counts.tolist(), strict=True))

    @property
    def impressions(self) -> int:
        return len(self.choices)

    @property
    def cumulative_regret(self) -> float:
        return float(self.regret[-1]) if len(self.regret) else 0.0

    def best_arm_share(self, last: int | None = None) -> float:
        """Share of the best arm among the last `last` impressions (default: the last quarter)."""
        last = last or max(self.impressions // 4, 1)
        tail = self.choices[-last:]
        return float((tail == self.arms.index(self.best_arm)).mean())

    def summary(self) -> dict:
        return {
            "policy": str(self.policy),
            "impressions": self.impressions,
            "cumulative_regret": round(self.cumulative_regret, 4),
            "best_arm": self.best_arm,
            "best_arm_share_last_quarter": round(self.best_arm_share(), 4),
            "counts": self.counts,
            "reward_sum": round(self.reward_sum, 4),
            "seconds": round(self.seconds, 4),
        }


def run_bandit(
    policy: Policy,
    simulator: ArmSimulator,
    impressions: int,
    rng: np.random.Generator,
    delay: int = 0,
    epsilon: float = 0.1,
) -> BanditResult:
    """Run `policy` for `impressions` impressions against `simulator`'s arms.

    Feedback is delayed and batched as in production: the policy chooses `delay` impressions in
    a row on the same posteriors, and their rewards are applied together before the next batch
    (`delay` 0 or 1: every reward is applied before the next choice). `rng` drives the policy;
    the simulator draws rewards with its own generator, so two policies run with simulators of
    the same seed see the same reward noise.
    """
    if impressions < 1:
        raise UserError(f"impressions must be at least 1, got {impressions}")
    if delay < 0:
        raise UserError(f"delay must be >= 0, got {delay}")
    policy, batch = Policy(policy), max(delay, 1)
    arms = len(simulator.arms)
    rewards = np.zeros(arms)
    reward_sum = np.zeros(arms)
    reward_square_sum = np.zeros(arms)
    choices = np.empty(impressions, dtype=np.int64)
    seconds = 0.0
    for start in range(0, impressions, batch):
        size = min(batch, impressions - start)
        sums = Sums(simulator.arms, rewards, reward_sum, reward_square_sum)
        started = time.perf_counter()
        chosen = choose_indices(sums, simulator.kind, policy, rng, size, epsilon)
        seconds += time.perf_counter() - started
        observed = simulator.rewards(chosen)
        choices[start : start + size] = chosen
        rewards = rewards + np.bincount(chosen, minlength=arms)
        reward_sum = reward_sum + np.bincount(chosen, observed, minlength=arms)
        reward_square_sum = reward_square_sum + np.bincount(chosen, observed**2, minlength=arms)
    best = int(simulator.means.argmax())
    regret = np.cumsum(simulator.means[best] - simulator.means[choices])
    return BanditResult(
        policy=policy,
        arms=simulator.arms,
        best_arm=simulator.arms[best],
        choices=choices,
        regret=regret,
        reward_sum=float(reward_sum.sum()),
        seconds=seconds,
    )
