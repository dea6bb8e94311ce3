"""The bandit math: each arm's posterior of its mean reward, and the policies that pick an arm.

Posteriors (one per `RewardKind`):

- `RATE` (CTR): Beta-Bernoulli with the uniform prior Beta(1, 1). A reward in [0, 1] counts as
  `reward` successes and `1 - reward` failures, so the sums are sufficient:
  alpha = 1 + reward_sum, beta = 1 + rewards - reward_sum.
- `CONTINUOUS` (watch time, revenue, RPM): Normal rewards with unknown mean and variance and the
  conjugate Normal-Inverse-Gamma prior; the posterior of the mean is a Student-t. Continuous
  metrics have no natural scale (seconds, USD, USD per 1,000 views), so the prior is weak and
  centred on the data (`NormalPrior.pooled`): its mean is the mean of all arms' rewards together,
  its scale their standard deviation, and it weighs one pseudo-reward for the mean (kappa0 = 1)
  and two for the variance (alpha0 = 1, so the prior t has 2 degrees of freedom: heavy tails).
  An arm with 0 or 1 rewards is then as uncertain as a single reward of the experiment, which
  is wide next to the differences between arms' means, so a new arm gets explored; after ~100
  rewards the prior's pull on an arm's mean is below 1 % of the distance to the pooled mean.

Policies (`Policy`), all vectorised over arms with numpy (no per-arm Python loop):

- `THOMPSON`: one draw from each arm's posterior, the arm with the highest draw.
- `EPSILON_GREEDY`: the arm with the best posterior mean (arms without rewards first), or with
  probability epsilon a uniformly random arm.
- `EVEN`: a uniformly random arm (a plain A/B/n split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as distributions

from contentml.errors import UserError
from training.revenue.experiment import ArmStats, Policy, RewardKind

RATE_PRIOR = (1.0, 1.0)
"""Beta(alpha, beta) prior of a rate: uniform on [0, 1]."""

PRIOR_MEAN_WEIGHT = 1.0
"""kappa0: the Normal prior's mean counts as this many rewards."""

PRIOR_SHAPE = 1.0
"""alpha0 of the Inverse-Gamma prior of the variance (2 * alpha0 = 2 pseudo-rewards)."""

UNIT_VARIANCE = 1.0
"""Prior variance when the rewards give none (no rewards, or all alike): one unit squared."""

RATE_TOLERANCE = 1e-9
"""Rounding slack when checking that a rate arm's reward sum lies in [0, rewards]."""


@dataclass(frozen=True)
class Choice:
    """The arm to show, and every arm's probability of being chosen under the policy."""

    arm: str
    probabilities: dict[str, float]
    """Sums to 1; exact for epsilon-greedy and even, Monte Carlo for Thompson."""


@dataclass(frozen=True)
class Sums:
    """Every arm's sufficient statistics as arrays, in the order of `arms`."""

    arms: tuple[str, ...]
    rewards: np.ndarray
    reward_sum: np.ndarray
    reward_square_sum: np.ndarray

    @classmethod
    def of(cls, stats: Sequence[ArmStats], kind: RewardKind) -> Sums:
        """Checked arrays from the arms' records: names unique, counts non-negative, sums
        finite and, for a rate, 0 <= reward_sum <= rewards."""
        if not stats:
            raise UserError("an experiment needs at least one arm")
        arms = tuple(s.arm for s in stats)
        if len(set(arms)) != len(arms):
            raise UserError(f"arm names must be unique, got {list(arms)}")
        rewards = np.array([s.rewards for s in stats], dtype=np.float64)
        reward_sum = np.array([s.reward_sum for s in stats], dtype=np.float64)
        squares = np.array([s.reward_square_sum for s in stats], dtype=np.float64)
        if (rewards < 0).any() or (squares < 0).any():
            raise UserError(f"negative reward count or square sum in {list(stats)}")
        if not (np.isfinite(reward_sum).all() and np.isfinite(squares).all()):
            raise UserError(f"non-finite reward sums in {list(stats)}")
        if kind is RewardKind.RATE and (
            (reward_sum < -RATE_TOLERANCE).any() or (reward_sum > rewards + RATE_TOLERANCE).any()
        ):
            raise UserError(
                f"rate rewards must lie in [0, 1]: reward_sum outside [0, rewards] in {list(stats)}"
            )
        return cls(arms, rewards, reward_sum, squares)


@dataclass(frozen=True)
class NormalPrior:
    """Normal-Inverse-Gamma prior: mean ~ N(mean, variance / kappa), variance ~ IG(alpha, beta)."""

    mean: float
    kappa: float
    alpha: float
    beta: float

    @classmethod
    def pooled(cls, sums: Sums) -> NormalPrior:
        """The weak data-centred prior of the module docstring, from all arms' rewards together."""
        count = float(sums.rewards.sum())
        if count == 0:
            mean, variance = 0.0, UNIT_VARIANCE
        else:
            mean = float(sums.reward_sum.sum()) / count
            variance = max(float(sums.reward_square_sum.sum()) / count - mean**2, 0.0)
            # All rewards alike: no spread to scale by, so the mean's size (or one unit).
            variance = variance or mean**2 or UNIT_VARIANCE
        return cls(mean, PRIOR_MEAN_WEIGHT, PRIOR_SHAPE, PRIOR_SHAPE * variance)


@dataclass(frozen=True)
class Posteriors:
    """Every arm's posterior of its mean reward: Beta(a, b), or Student-t(df, loc, scale)."""

    kind: RewardKind
    arms: tuple[str, ...]
    params: tuple[np.ndarray, ...]
    rewards: np.ndarray
    """Rewards each arm's posterior has seen (0: the arm is untried)."""

    def mean(self) -> np.ndarray:
        return _MEAN[self.kind](*self.params)

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """`size` joint draws: shape (size, arms)."""
        return _DRAW[self.kind](rng, size, *self.params)

    def interval(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        """Equal-tailed credible interval of each arm's mean."""
        if not 0 < level < 1:
            raise UserError(f"credible level must be in (0, 1), got {level}")
        tail, quantile = (1 - level) / 2, _QUANTILE[self.kind]
        return quantile(tail, *self.params), quantile(1 - tail, *self.params)


def _beta_params(sums: Sums, prior: NormalPrior | None) -> tuple[np.ndarray, ...]:
    a0, b0 = RATE_PRIOR
    return a0 + sums.reward_sum, b0 + np.maximum(sums.rewards - sums.reward_sum, 0.0)


def _student_t_params(sums: Sums, prior: NormalPrior | None) -> tuple[np.ndarray, ...]:
    prior = prior or NormalPrior.pooled(sums)
    n = sums.rewards
    sample_mean = np.divide(sums.reward_sum, n, out=np.zeros_like(n), where=n > 0)
    within = np.maximum(sums.reward_square_sum - n * sample_mean**2, 0.0)
    kappa = prior.kappa + n
    loc = (prior.kappa * prior.mean + sums.reward_sum) / kappa
    alpha = prior.alpha + n / 2
    beta = prior.beta + within / 2 + prior.kappa * n * (sample_mean - prior.mean) ** 2 / (2 * kappa)
    return 2 * alpha, loc, np.sqrt(beta / (alpha * kappa))


def _draw_beta(rng: np.random.Generator, size: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return rng.beta(a, b, size=(size, len(a)))


def _draw_t(
    rng: np.random.Generator, size: int, df: np.ndarray, loc: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    return loc + scale * rng.standard_t(df, size=(size, len(df)))


_PARAMS: dict[RewardKind, Callable[[Sums, NormalPrior | None], tuple[np.ndarray, ...]]] = {
    RewardKind.RATE: _beta_params,
    RewardKind.CONTINUOUS: _student_t_params,
}
_MEAN: dict[RewardKind, Callable[..., np.ndarray]] = {
    RewardKind.RATE: lambda a, b: a / (a + b),
    RewardKind.CONTINUOUS: lambda df, loc, scale: loc,
}
_DRAW: dict[RewardKind, Callable[..., np.ndarray]] = {
    RewardKind.RATE: _draw_beta,
    RewardKind.CONTINUOUS: _draw_t,
}
_QUANTILE: dict[RewardKind, Callable[..., np.ndarray]] = {
    RewardKind.RATE: lambda q, a, b: distributions.beta.ppf(q, a, b),
    RewardKind.CONTINUOUS: lambda q, df, loc, scale: distributions.t.ppf(q, df, loc, scale),
}


def posteriors(sums: Sums, kind: RewardKind, prior: NormalPrior | None = None) -> Posteriors:
    """Every arm's posterior; `prior` (continuous only) defaults to `NormalPrior.pooled(sums)`."""
    kind = RewardKind(kind)
    return Posteriors(kind, sums.arms, _PARAMS[kind](sums, prior), sums.rewards)


def argmax_random(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row, the column of the largest value; ties broken uniformly at random."""
    ties = values == values.max(axis=1, keepdims=True)
    if ties.sum() == len(values):  # no ties: the common case, no random numbers spent
        return values.argmax(axis=1)
    return np.argmax(ties * (1 + rng.random(ties.shape)), axis=1)


def share_best(draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each column's share of the rows (joint draws) in which it holds the largest value."""
    return np.bincount(argmax_random(draws, rng), minlength=draws.shape[1]) / len(draws)


def losses(draws: np.ndarray) -> np.ndarray:
    """Each column's mean shortfall from the row's largest value (its expected loss)."""
    return (draws.max(axis=1, keepdims=True) - draws).mean(axis=0)


# A policy, given the posteriors: `size` choices (column indices) and, when `samples` > 0, every
# arm's probability of being chosen (exact, or Monte Carlo over max(size, samples) draws).
Rule = Callable[
    [Posteriors, np.random.Generator, float, int, int], tuple[np.ndarray, np.ndarray | None]
]


def _thompson(
    post: Posteriors, rng: np.random.Generator, epsilon: float, size: int, samples: int
) -> tuple[np.ndarray, np.ndarray | None]:
    winners = argmax_random(post.draw(rng, max(size, samples)), rng)
    shares = np.bincount(winners, minlength=len(post.arms)) / len(winners) if samples else None
    return winners[:size], shares


def _epsilon_greedy(
    post: Posteriors, rng: np.random.Generator, epsilon: float, size: int, samples: int
) -> tuple[np.ndarray, np.ndarray | None]:
    untried = post.rewards == 0
    if untried.any():
        greedy = untried
    else:
        means = post.mean()
        greedy = means == means.max()
    probabilities = epsilon / len(greedy) + (1 - epsilon) * greedy / greedy.sum()
    return rng.choice(len(greedy), size=size, p=probabilities), probabilities


def _even(
    post: Posteriors, rng: np.random.Generator, epsilon: float, size: int, samples: int
) -> tuple[np.ndarray, np.ndarray | None]:
    arms = len(post.arms)
    return rng.integers(arms, size=size), np.full(arms, 1 / arms)


POLICY_TO_RULE: dict[Policy, Rule] = {
    Policy.THOMPSON: _thompson,
    Policy.EPSILON_GREEDY: _epsilon_greedy,
    Policy.EVEN: _even,
}


def choose_indices(
    sums: Sums,
    kind: RewardKind,
    policy: Policy,
    rng: np.random.Generator,
    size: int,
    epsilon: float = 0.1,
) -> np.ndarray:
    """`size` choices (indices into `sums.arms`) made on the same posteriors: a batch of
    impressions served before any of their rewards come back (the simulator's fast path)."""
    _check_epsilon(epsilon)
    return POLICY_TO_RULE[Policy(policy)](posteriors(sums, kind), rng, epsilon, size, 0)[0]


def choose(
    stats: Sequence[ArmStats],
    kind: RewardKind,
    policy: Policy,
    rng: np.random.Generator,
    epsilon: float = 0.1,
    samples: int = 2000,
) -> Choice:
    """The arm to show next under `policy`, and every arm's probability of being chosen.

    Thompson: the arm is the argmax of one joint posterior draw; the probabilities are each
    arm's share of the argmax over `samples` joint draws (the first of which chose the arm).
    """
    _check_epsilon(epsilon)
    if samples < 1:
        raise UserError(f"samples must be at least 1, got {samples}")
    sums = Sums.of(stats, kind)
    chosen, probabilities = POLICY_TO_RULE[Policy(policy)](
        posteriors(sums, kind), rng, epsilon, 1, samples
    )
    return Choice(
        arm=sums.arms[int(chosen[0])],
        probabilities={arm: float(p) for arm, p in zip(sums.arms, probabilities, strict=True)},
    )


def probability_best(
    stats: Sequence[ArmStats],
    kind: RewardKind,
    rng: np.random.Generator,
    samples: int = 20_000,
    prior: NormalPrior | None = None,
) -> dict[str, float]:
    """Each arm's posterior probability of having the highest mean (Monte Carlo)."""
    post = posteriors(Sums.of(stats, kind), kind, prior)
    return dict(zip(post.arms, share_best(post.draw(rng, samples), rng).tolist(), strict=True))


def expected_loss(
    stats: Sequence[ArmStats],
    kind: RewardKind,
    rng: np.random.Generator,
    samples: int = 20_000,
    prior: NormalPrior | None = None,
) -> dict[str, float]:
    """Each arm's expected loss E[max_j theta_j - theta_i]: what choosing it for good costs per
    impression, in the metric's unit, averaged over the posterior (Monte Carlo)."""
    post = posteriors(Sums.of(stats, kind), kind, prior)
    return dict(zip(post.arms, losses(post.draw(rng, samples)).tolist(), strict=True))


def credible_interval(
    stat: ArmStats, kind: RewardKind, level: float = 0.95, prior: NormalPrior | None = None
) -> tuple[float, float]:
    """Equal-tailed credible interval of the arm's mean reward (Beta or Student-t quantiles).

    For a continuous metric pass the experiment's `NormalPrior.pooled` to judge the arm with the
    same prior as its siblings; alone, the prior is centred on the arm's own rewards.
    """
    low, high = posteriors(Sums.of([stat], kind), kind, prior).interval(level)
    return float(low[0]), float(high[0])


def _check_epsilon(epsilon: float) -> None:
    if not 0 <= epsilon <= 1:
        raise UserError(f"epsilon must be in [0, 1], got {epsilon}")
