"""`make bench`: the bandit as the content pipeline meets it, over HTTP against
`contentml serve --models revenue`, killed (SIGKILL) and restarted halfway through.

A client that hides the arms' click rates asks for an arm per impression and posts the reward
after each one. Two experiments: `benchmarks.revenue`'s `distinct` categories (real engagement
rates from the trending data, a winner to find) and three close rates (0.04 / 0.06 / 0.05).
After half the impressions the server is killed with SIGKILL, which skips every shutdown hook,
and started again on the same store: the report must hold every impression and reward (the
store is written before each answer). Figures per experiment: the best arm's share of the last
`LAST` impressions, cumulative regret as a ratio to an even split's (the same impressions),
P(best) and the stop rule's recommendation at the end, and the time of one choice over HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time

import httpx
import numpy as np
import psutil

from benchmarks.revenue import LAST, distinct_arms
from benchmarks.timing import summary
from contentml.settings import Settings
from entrypoints.demo import free_port, model_server
from training.revenue.simulator import category_rates

IMPRESSIONS = 20_000
CLOSE_RATES = {"a": 0.04, "b": 0.06, "c": 0.05}


def impressions(url: str, experiment: str, rates: dict[str, float], count: int, seed: int):
    """`count` impressions, a reward posted after each: the arms shown and each choice's ms."""
    rng = np.random.default_rng(seed)
    shown, timings = [], []
    with httpx.Client(base_url=url, timeout=10.0) as client:
        for _ in range(count):
            started = time.perf_counter()
            answer = client.post(
                "/v1/models/revenue:predict",
                json={"instances": [{"experiment": experiment, "arms": list(rates)}]},
            )
            timings.append((time.perf_counter() - started) * 1000)
            if answer.status_code != 200:
                raise RuntimeError(f"choice answered {answer.status_code}: {answer.text}")
            arm = answer.json()["predictions"][0]["arm"]
            reward = float(rng.random() < rates[arm])
            client.post(
                f"/v1/experiments/{experiment}/rewards", json=[{"arm": arm, "reward": reward}]
            ).raise_for_status()
            shown.append(arm)
    return shown, timings


def experiment_report(url: str, experiment: str) -> dict:
    answer = httpx.get(f"{url}/v1/experiments/{experiment}", timeout=30.0)
    answer.raise_for_status()
    return answer.json()


def arm_counts(report: dict) -> dict[str, tuple[int, float]]:
    return {a["arm"]: (a["impressions"], a["rewards"]) for a in report["arms"]}


def kill_server() -> None:
    """SIGKILL the model server (this process's only child tree): no shutdown hook runs."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        child.send_signal(signal.SIGKILL)
    psutil.wait_procs(children, timeout=30)


def run_experiment(settings: Settings, name: str, rates: dict[str, float], count: int) -> dict:
    port = free_port()
    half = count // 2
    with model_server(settings, port, "--models", "revenue") as url:
        first, first_ms = impressions(url, name, rates, half, seed=1)
        before = arm_counts(experiment_report(url, name))
        kill_server()
    with model_server(settings, port, "--models", "revenue") as url:
        after = arm_counts(experiment_report(url, name))
        second, second_ms = impressions(url, name, rates, count - half, seed=2)
        final = experiment_report(url, name)
    shown = first + second
    best_arm = max(rates, key=rates.get)
    best = rates[best_arm]
    regret = sum(best - rates[arm] for arm in shown)
    even = len(shown) * (best - sum(rates.values()) / len(rates))
    return {
        "rates": rates,
        "impressions": len(shown),
        "best_arm": best_arm,
        "best_share_last": round(shown[-LAST:].count(best_arm) / min(LAST, len(shown)), 3),
        "regret_over_even": round(regret / even, 3),
        "restart_kept_every_count": before == after and sum(n for n, _ in after.values()) == half,
        "impressions_stored": sum(a["impressions"] for a in final["arms"]),
        "probability_best": round(
            next(a["probability_best"] for a in final["arms"] if a["arm"] == best_arm), 3
        ),
        "recommendation": final["recommendation"],
        "choice": summary(first_ms + second_ms),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impressions", type=int, default=IMPRESSIONS)
    args = parser.parse_args(argv)
    if args.impressions < 2:
        parser.error("--impressions must be at least 2 (half before the restart, half after)")
    # Arm names are identifiers (letters, digits, '-', '_'): the categories' names are slugged.
    categories = {
        re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"): rate
        for name, rate in distinct_arms(category_rates(Settings.from_env().data_dir)).items()
    }
    report: dict = {"benchmark": "revenue_served", "experiments": {}}
    with tempfile.TemporaryDirectory(prefix="contentml-bench-") as home:
        settings = Settings.from_env({**os.environ, "CONTENTML_HOME": home})
        for name, rates in (("categories", categories), ("close", CLOSE_RATES)):
            figures = run_experiment(settings, name, rates, args.impressions)
            report["experiments"][name] = figures
            print(f"[bench] served bandit {name}: {figures}", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
