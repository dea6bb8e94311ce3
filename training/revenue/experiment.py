"""What an experiment is: its arms, the metric they are judged on, the policy that picks one,
and the sufficient statistics of the rewards each arm got so far (all a posterior needs)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Metric(StrEnum):
    """What a reward measures."""

    CTR = "ctr"  # a click (1) or not (0) per impression
    WATCH_TIME = "watch_time"  # seconds watched per impression
    REVENUE = "revenue"  # USD per impression
    RPM = "rpm"  # revenue per 1,000 views, per reported batch


class RewardKind(StrEnum):
    RATE = "rate"  # in [0, 1]: Beta-Bernoulli
    CONTINUOUS = "continuous"  # any real: Normal with unknown mean and variance


METRIC_KIND: dict[Metric, RewardKind] = {
    Metric.CTR: RewardKind.RATE,
    Metric.WATCH_TIME: RewardKind.CONTINUOUS,
    Metric.REVENUE: RewardKind.CONTINUOUS,
    Metric.RPM: RewardKind.CONTINUOUS,
}


class Policy(StrEnum):
    """How the next arm is chosen."""

    THOMPSON = "thompson"  # sample each arm's posterior, take the best sample (the default)
    EPSILON_GREEDY = "epsilon_greedy"  # the best mean, or with probability epsilon any arm
    EVEN = "even"  # every arm alike: a plain A/B(/n) split


@dataclass(frozen=True)
class ArmStats:
    """One arm's record: how often it was chosen, and the rewards reported for it."""

    arm: str
    impressions: int
    """Times the arm was chosen (`:predict` answers)."""
    rewards: int
    """Rewards reported for it (`/rewards`); feedback is delayed, so at most `impressions`."""
    reward_sum: float
    reward_square_sum: float

    @property
    def mean(self) -> float | None:
        return self.reward_sum / self.rewards if self.rewards else None
