"""The durable record of every experiment: its definition, each reward as reported, and per arm
the running totals a posterior needs. SQLite embedded, PostgreSQL in the cluster
(`Settings.revenue_store`), so a restarted server, or any of several replicas, continues an
experiment exactly where it stands.

Totals are updated in the same transaction as the rewards they sum (`x = x + ?`, atomic on
both databases), so a choice reads a handful of rows however long the experiment ran; the raw
rewards stay for the report's history and to rebuild the totals (`rebuild`).
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from contentml.db import open_database
from contentml.errors import UserError
from training.revenue.experiment import METRIC_KIND, ArmStats, Metric, Policy, RewardKind

MAX_ARMS = 100
MAX_NAME = 200
MAX_REWARD = 1e9
"""Largest magnitude of one reward, on every metric: far beyond any watch time (seconds),
revenue or RPM (USD) one impression or report earns, and small enough that the totals' squares
(at most 1e18 each) stay finite for any number of rewards; an infinite sum would make every
later choice and report of the experiment fail."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")

metadata = sa.MetaData()

experiments = sa.Table(
    "revenue_experiments",
    metadata,
    sa.Column("name", sa.String(MAX_NAME), primary_key=True),
    sa.Column("metric", sa.String(32), nullable=False),
    sa.Column("policy", sa.String(32), nullable=False),
    sa.Column("arms", sa.Text, nullable=False),  # JSON list, in the order first given
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

arm_totals = sa.Table(
    "revenue_arm_totals",
    metadata,
    sa.Column("experiment", sa.String(MAX_NAME), primary_key=True),
    sa.Column("arm", sa.String(MAX_NAME), primary_key=True),
    sa.Column("impressions", sa.BigInteger, nullable=False),
    sa.Column("rewards", sa.BigInteger, nullable=False),
    sa.Column("reward_sum", sa.Float, nullable=False),
    sa.Column("reward_square_sum", sa.Float, nullable=False),
)

rewards = sa.Table(
    "revenue_rewards",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("experiment", sa.String(MAX_NAME), nullable=False, index=True),
    sa.Column("arm", sa.String(MAX_NAME), nullable=False),
    sa.Column("reward", sa.Float, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


class ExperimentError(UserError):
    """A request the experiment cannot take (unknown arm, bad reward, ...); nothing is stored."""


class UnknownExperiment(ExperimentError):
    """No experiment of that name."""


@dataclass(frozen=True)
class Experiment:
    name: str
    metric: Metric
    policy: Policy
    arms: tuple[str, ...]
    created_at: datetime.datetime

    @property
    def kind(self) -> RewardKind:
        return METRIC_KIND[self.metric]

    def to_dict(self) -> dict:
        """JSON-ready, as `contentml experiments list` and `GET /v1/experiments` give it."""
        return {
            "name": self.name,
            "metric": self.metric.value,
            "policy": self.policy.value,
            "arms": list(self.arms),
            "created_at": self.created_at.isoformat(),
        }

    @classmethod
    def from_row(cls, row: sa.Row) -> Experiment:
        return cls(
            row.name, Metric(row.metric), Policy(row.policy), tuple(json.loads(row.arms)),
            row.created_at,
        )  # fmt: skip


@dataclass(frozen=True)
class Standing:
    """An experiment and each arm's totals (in its arm order), read together."""

    experiment: Experiment
    stats: tuple[ArmStats, ...]

    def with_impression(self, arm: str) -> Standing:
        """The standing after one more impression of `arm`."""
        stats = tuple(
            replace(s, impressions=s.impressions + 1) if s.arm == arm else s for s in self.stats
        )
        return Standing(self.experiment, stats)


def check_name(what: str, name: object) -> str:
    if not (isinstance(name, str) and len(name) <= MAX_NAME and _NAME.fullmatch(name)):
        raise ExperimentError(
            f"{what} must be letters, digits and _.:- (at most {MAX_NAME}), not {name!r}"
        )
    return name


def check_arms(arms: object) -> tuple[str, ...]:
    if not isinstance(arms, list | tuple) or not 2 <= len(arms) <= MAX_ARMS:
        raise ExperimentError(f"arms must be a list of 2 to {MAX_ARMS} names, not {arms!r}")
    names = tuple(check_name("an arm", arm) for arm in arms)
    if len(set(names)) != len(names):
        raise ExperimentError(f"arms must be distinct: {list(names)}")
    return names


def check_reward(experiment: Experiment, arm: object, reward: object) -> tuple[str, float]:
    """One reported outcome, checked against the experiment: a known arm, a finite number,
    within [0, 1] for a rate."""
    if arm not in experiment.arms:
        raise ExperimentError(
            f"experiment {experiment.name!r} has no arm {arm!r}; arms: {list(experiment.arms)}"
        )
    # An int is finite however large, and too large for `math.isfinite` (OverflowError).
    if (
        isinstance(reward, bool)
        or not isinstance(reward, int | float)
        or (isinstance(reward, float) and not math.isfinite(reward))
    ):
        raise ExperimentError(f"reward for arm {arm!r} must be a finite number, not {reward!r}")
    if not -MAX_REWARD <= reward <= MAX_REWARD:
        raise ExperimentError(
            f"reward for arm {arm!r} must be within +-{MAX_REWARD:g}, not {reward!r:.40}"
        )
    if experiment.kind is RewardKind.RATE and not 0.0 <= reward <= 1.0:
        raise ExperimentError(
            f"{experiment.metric.value} rewards are rates in [0, 1] (a click is 1), not {reward!r}"
        )
    return str(arm), float(reward)


def matching(
    found: Experiment, arms: Sequence[str], metric: Metric | None, policy: Policy | None
) -> Experiment:
    """`found` when a request for `arms` (checked), `metric` and `policy` (None: any) matches
    it; else an error naming what does not."""
    if set(found.arms) != set(arms):
        raise ExperimentError(
            f"experiment {found.name!r} has arms {list(found.arms)}, not {list(arms)}; "
            f"start a new experiment for other variants"
        )
    for asked, kept in ((metric, found.metric), (policy, found.policy)):
        if asked is not None and asked != kept:
            raise ExperimentError(f"experiment {found.name!r} uses {kept.value}, not {asked.value}")
    return found


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class RewardStore:
    """Experiments, their rewards and running totals, in the database at `url`."""

    def __init__(self, url: str):
        self.engine = open_database(url, metadata)

    def close(self) -> None:
        self.engine.dispose()

    def experiment(self, name: str) -> Experiment:
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(experiments).where(experiments.c.name == name)
            ).one_or_none()
        if row is None:
            raise UnknownExperiment(f"no experiment {name!r}")
        return Experiment.from_row(row)

    def ensure(
        self,
        name: str,
        arms: Sequence[str],
        metric: Metric | None = None,
        policy: Policy | None = None,
    ) -> Experiment:
        """The experiment `name`, created on first use with these arms (CTR and Thompson
        sampling unless given); an existing one must have the same arms (in any order), and the
        metric and policy when they are given."""
        arms = check_arms(arms)
        found = self.check_request(name, arms, metric, policy)
        if found is None:
            found = self._create(name, arms, metric or Metric.CTR, policy or Policy.THOMPSON)
            found = self.check_request(name, arms, metric, policy)  # another replica's
        return found

    def check_request(
        self,
        name: str,
        arms: Sequence[str],
        metric: Metric | None = None,
        policy: Policy | None = None,
    ) -> Experiment | None:
        """What `ensure` checks, without storing anything: the existing experiment (None when
        there is none yet), or an error naming what does not match."""
        check_name("experiment", name)
        arms = check_arms(arms)
        try:
            found = self.experiment(name)
        except UnknownExperiment:
            return None
        return matching(found, arms, metric, policy)

    def _create(self, name: str, arms: Sequence[str], metric: Metric, policy: Policy):
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    experiments.insert().values(
                        name=name,
                        metric=metric.value,
                        policy=policy.value,
                        arms=json.dumps(list(arms)),
                        created_at=_now(),
                    )
                )
                connection.execute(
                    arm_totals.insert(),
                    [
                        {"experiment": name, "arm": arm, "impressions": 0, "rewards": 0,
                         "reward_sum": 0.0, "reward_square_sum": 0.0}
                        for arm in arms
                    ],
                )  # fmt: skip
        except IntegrityError:
            pass  # another replica created it first: use theirs
        return self.experiment(name)

    def stats(self, name: str) -> list[ArmStats]:
        """Each arm's totals, in the experiment's arm order."""
        return self.stats_of(self.experiment(name))

    def stats_of(self, experiment: Experiment) -> list[ArmStats]:
        """`stats` of an experiment already read (one query fewer on the choice's path)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(arm_totals).where(arm_totals.c.experiment == experiment.name)
            ).all()
        by_arm = {
            row.arm: ArmStats(
                row.arm, row.impressions, row.rewards, row.reward_sum, row.reward_square_sum
            )
            for row in rows
        }
        return [by_arm[arm] for arm in experiment.arms]

    def standings(self, names: Sequence[str]) -> dict[str, Standing | None]:
        """Each named experiment with `stats_of` it (None for an unknown name), in two queries
        however many names: what a server holds in memory and refreshes."""
        if not names:
            return {}
        with self.engine.connect() as connection:
            found = [
                Experiment.from_row(row)
                for row in connection.execute(
                    sa.select(experiments).where(experiments.c.name.in_(names))
                )
            ]
            totals = connection.execute(
                sa.select(arm_totals).where(arm_totals.c.experiment.in_([e.name for e in found]))
            ).all()
        by_key = {
            (row.experiment, row.arm): ArmStats(
                row.arm, row.impressions, row.rewards, row.reward_sum, row.reward_square_sum
            )
            for row in totals
        }
        answer: dict[str, Standing | None] = dict.fromkeys(names)
        for experiment in found:
            stats = tuple(by_key[(experiment.name, arm)] for arm in experiment.arms)
            answer[experiment.name] = Standing(experiment, stats)
        return answer

    def record_impression(self, name: str, arm: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                arm_totals.update()
                .where(arm_totals.c.experiment == name, arm_totals.c.arm == arm)
                .values(impressions=arm_totals.c.impressions + 1)
            )

    def add_rewards(self, name: str, outcomes: list[tuple[object, object]]) -> int:
        """Store `(arm, reward)` pairs in one transaction: all of them, or none when one is
        bad. Returns how many were stored."""
        experiment = self.experiment(name)
        if not outcomes:
            raise ExperimentError("no rewards given")
        checked = [check_reward(experiment, arm, reward) for arm, reward in outcomes]
        now = _now()
        per_arm: dict[str, list[float]] = {}
        for arm, reward in checked:
            per_arm.setdefault(arm, []).append(reward)
        with self.engine.begin() as connection:
            connection.execute(
                rewards.insert(),
                [
                    {"experiment": name, "arm": arm, "reward": reward, "created_at": now}
                    for arm, reward in checked
                ],
            )
            for arm, values in per_arm.items():
                connection.execute(
                    arm_totals.update()
                    .where(arm_totals.c.experiment == name, arm_totals.c.arm == arm)
                    .values(
                        rewards=arm_totals.c.rewards + len(values),
                        reward_sum=arm_totals.c.reward_sum + sum(values),
                        reward_square_sum=arm_totals.c.reward_square_sum
                        + sum(v * v for v in values),
                    )
                )
        return len(checked)

    def history(self, name: str) -> pd.DataFrame:
        """Every reward of the experiment in the order it was stored: timestamp, arm, reward."""
        self.experiment(name)
        query = (
            sa.select(rewards.c.created_at.label("timestamp"), rewards.c.arm, rewards.c.reward)
            .where(rewards.c.experiment == name)
            .order_by(rewards.c.id)
        )
        with self.engine.connect() as connection:
            return pd.DataFrame(
                connection.execute(query).all(), columns=["timestamp", "arm", "reward"]
            )

    def rebuild(self, name: str) -> list[ArmStats]:
        """Recompute the reward totals from the stored rewards (impressions are counted only
        in the totals) and return the stats."""
        self.experiment(name)
        sums = (
            sa.select(
                rewards.c.arm,
                sa.func.count().label("n"),
                sa.func.sum(rewards.c.reward).label("total"),
                sa.func.sum(rewards.c.reward * rewards.c.reward).label("squares"),
            )
            .where(rewards.c.experiment == name)
            .group_by(rewards.c.arm)
        )
        with self.engine.begin() as connection:
            found = {row.arm: row for row in connection.execute(sums)}
            for arm in self.experiment(name).arms:
                row = found.get(arm)
                connection.execute(
                    arm_totals.update()
                    .where(arm_totals.c.experiment == name, arm_totals.c.arm == arm)
                    .values(
                        rewards=row.n if row else 0,
                        reward_sum=float(row.total) if row else 0.0,
                        reward_square_sum=float(row.squares) if row else 0.0,
                    )
                )
        return self.stats(name)

    def all(self) -> list[Experiment]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(experiments).order_by(experiments.c.created_at))
            return [Experiment.from_row(row) for row in rows]
