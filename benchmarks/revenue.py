"""`make bench`: Thompson sampling against the even split and epsilon-greedy, measured in the
same run on the same simulated experiments.

The arms are YouTube categories and their click rates the categories' real engagement rates
((likes + comments) per view in the trending data, `simulator.category_rates`), in two cases:

- `distinct`: `DISTINCT_ARMS` categories whose rates are each at least `MIN_GAP` (relative)
  below the previous one: a winner to find.
- `close`: the `CLOSE_ARMS` adjacent categories whose rates are nearest (relative spread): the
  hard case, where no policy can tell the arms apart quickly and regret is small anyway.

Each policy runs `IMPRESSIONS` impressions for each of `SEEDS` seeds (the same reward noise for
every policy of a seed), with feedback after every impression and batched every `BATCH`
impressions (the production case), and `LONG_IMPRESSIONS` batched: epsilon-greedy's regret grows
linearly with the impressions (it keeps exploring a share epsilon), Thompson's about with their
logarithm, so which is ahead depends on the horizon. Figures: cumulative regret (sum of best rate
- chosen rate; mean, standard deviation and worst seed) as ratios Thompson / even and Thompson /
epsilon-greedy, the best arm's share of the last `LAST` impressions, and the time of one `choose`
call (what a `:predict` spends in the bandit) for 3, 5 and 10 arms.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.timing import percentiles
from contentml.settings import Settings
from training.revenue.experiment import ArmStats, Policy, RewardKind
from training.revenue.policies import choose
from training.revenue.simulator import Simulator, category_rates, run_bandit

IMPRESSIONS = 20_000
LONG_IMPRESSIONS = 200_000
SEEDS = 10
LAST = 5_000
BATCH = 500
RUNS = ((IMPRESSIONS, 0), (IMPRESSIONS, BATCH), (LONG_IMPRESSIONS, BATCH))
"""(impressions, delay) of each comparison."""
DISTINCT_ARMS = 4
MIN_GAP = 0.15
CLOSE_ARMS = 3
EPSILON = 0.1
CHOICE_CALLS = 1_000
CHOICE_ARMS = (3, 5, 10)


def distinct_arms(rates: dict[str, float]) -> dict[str, float]:
    """From the highest rate down, each next category at least `MIN_GAP` below the last taken."""
    chosen: dict[str, float] = {}
    for name, rate in sorted(rates.items(), key=lambda item: -item[1]):
        if not chosen or rate <= min(chosen.values()) * (1 - MIN_GAP):
            chosen[name] = rate
        if len(chosen) == DISTINCT_ARMS:
            return chosen
    raise SystemExit(f"fewer than {DISTINCT_ARMS} categories {MIN_GAP:.0%} apart: {rates}")


def close_arms(rates: dict[str, float]) -> dict[str, float]:
    """The `CLOSE_ARMS` categories adjacent by rate with the smallest relative spread."""
    ordered = sorted(rates.items(), key=lambda item: -item[1])
    windows = [ordered[i : i + CLOSE_ARMS] for i in range(len(ordered) - CLOSE_ARMS + 1)]
    return dict(min(windows, key=lambda w: w[0][1] / w[-1][1]))


def compare(rates: dict[str, float], impressions: int, delay: int) -> dict:
    """Every policy on the same seeds; regret and best-arm share per policy, and the ratios."""
    figures: dict[str, dict] = {}
    for policy in Policy:
        regrets, shares, seconds = [], [], []
        for seed in range(SEEDS):
            result = run_bandit(
                policy,
                Simulator(rates, np.random.default_rng([seed, 1])),
                impressions,
                np.random.default_rng([seed, 2]),
                delay=delay,
                epsilon=EPSILON,
            )
            regrets.append(result.cumulative_regret)
            shares.append(result.best_arm_share(LAST))
            seconds.append(result.seconds)
        figures[policy.value] = {
            "regret_mean": round(float(np.mean(regrets)), 2),
            "regret_sd": round(float(np.std(regrets, ddof=1)), 2),
            "regret_max": round(float(np.max(regrets)), 2),
            "best_share_last": round(float(np.mean(shares)), 3),
            "us_per_impression": round(1e6 * float(np.sum(seconds)) / (SEEDS * impressions), 2),
        }
    thompson = figures[Policy.THOMPSON.value]["regret_mean"]
    for other in (Policy.EVEN, Policy.EPSILON_GREEDY):
        figures[f"thompson_over_{other.value}"] = round(
            thompson / figures[other.value]["regret_mean"], 3
        )
    return figures


def choice_latency() -> dict[str, dict[str, float]]:
    """One `choose` call (2,000 joint draws for Thompson's probabilities) mid-experiment."""
    results = {}
    rng = np.random.default_rng(0)
    for arms in CHOICE_ARMS:
        rates = np.linspace(0.03, 0.05, arms)
        stats = [
            ArmStats(f"arm{i}", 2_000, 1_900, 1_900 * rate, 1_900 * rate)
            for i, rate in enumerate(rates)
        ]
        for policy in Policy:
            results[f"{policy.value}_{arms}_arms"] = percentiles(
                lambda policy=policy, stats=stats: choose(stats, RewardKind.RATE, policy, rng),
                CHOICE_CALLS,
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    rates = category_rates(Settings.from_env().data_dir)
    report: dict = {
        "benchmark": "revenue",
        "seeds": SEEDS,
        "last": LAST,
        "epsilon": EPSILON,
        "cases": {},
    }
    for case, arms in (("distinct", distinct_arms(rates)), ("close", close_arms(rates))):
        shown = ", ".join(f"{name} {rate:.4f}" for name, rate in arms.items())
        print(f"[bench] {case}: {shown}", file=sys.stderr)
        report["cases"][case] = {"rates": {k: round(v, 6) for k, v in arms.items()}}
        for impressions, delay in RUNS:
            figures = compare(arms, impressions, delay)
            report["cases"][case][f"n{impressions}_delay{delay}"] = figures
            run = f"{case:<8} n={impressions:<7,} delay {delay:>3}"
            for policy in Policy:
                row = figures[policy.value]
                print(
                    f"[bench] {run} {policy.value:<14} "
                    f"regret {row['regret_mean']:>7.1f} ± {row['regret_sd']:>6.1f} "
                    f"(worst {row['regret_max']:>7.1f})  "
                    f"best share (last {LAST:,}) {row['best_share_last']:.3f}  "
                    f"{row['us_per_impression']:>5.1f} µs/impression",
                    file=sys.stderr,
                )
            print(
                f"[bench] {run} thompson/even {figures['thompson_over_even']:.3f}  "
                f"thompson/epsilon_greedy {figures['thompson_over_epsilon_greedy']:.3f}",
                file=sys.stderr,
            )
    report["choose_latency"] = choice_latency()
    for name, row in report["choose_latency"].items():
        print(
            f"[bench] choose {name:<26} p50 {row['p50_ms']:>6} ms  p99 {row['p99_ms']:>6} ms",
            file=sys.stderr,
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
