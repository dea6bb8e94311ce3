"""The A/B report: each arm's posterior, which arm is best and whether the experiment can stop,
as a dict (for the API and the CLI) and as one self-contained HTML page (for people).

The stop rule is Bayesian: stop when one arm is best with probability >= `STOP_PROBABILITY`
*and* choosing it for good costs, in expectation, less than `LOSS_TOLERANCE` of its mean (or
`LOSS_FLOOR[metric]` when its mean is about zero). Both must hold: a high probability alone can
come from arms that are practically equal, and a small loss alone from an experiment too young
to tell. Before the experiment has `MIN_REWARDS` rewards the answer is always "continue": a
posterior of a few rewards is too sensitive to its prior and to early luck to act on. The
minimum is over the whole experiment, not per arm: a bandit gives a losing arm few impressions
by design, and that arm's wide posterior already keeps the leader's probability of being best
down until the difference is clear.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, qualitative

from contentml.errors import UserError
from training.revenue.experiment import METRIC_KIND, ArmStats, Metric, RewardKind
from training.revenue.policies import NormalPrior, Sums, losses, posteriors, share_best
from training.revenue.store import RewardStore

STOP_PROBABILITY = 0.95
"""The best arm's posterior probability of being best needed to stop."""

LOSS_TOLERANCE = 0.01
"""The best arm's expected loss needed to stop, as a share of its mean (1 %)."""

LOSS_FLOOR: dict[Metric, float] = {
    Metric.CTR: 1e-4,  # 0.01 percentage points of click rate
    Metric.WATCH_TIME: 0.1,  # a tenth of a second per impression
    Metric.REVENUE: 1e-5,  # USD per impression (1 cent per 1,000 impressions)
    Metric.RPM: 0.01,  # a cent of revenue per 1,000 views
}
"""Absolute expected-loss threshold, in the metric's unit: the one used when 1 % of the best
arm's mean is smaller (a mean near zero)."""

MIN_REWARDS = 100
"""Rewards the experiment needs, all arms together, before the report may recommend stopping."""

CREDIBLE_LEVEL = 0.95
"""Level of the reported credible intervals."""

SAMPLES = 20_000
"""Joint posterior draws behind probability_best and expected_loss (Monte Carlo error of a
probability <= 0.0035 standard deviations)."""

HISTORY_POINTS = 50
"""Points along the history at which the HTML page plots each arm's posterior."""

HISTORY_COLUMNS = ("timestamp", "arm", "reward")


def report(stats: Sequence[ArmStats], metric: Metric, rng_seed: int = 0) -> dict:
    """Each arm's figures, the best arm and the recommendation; the same for the same seed.

    `arms` is a list, in the order of `stats`, of: `arm`, `impressions`, `rewards`, `mean` (the
    observed mean; None without rewards), `ci_low`, `ci_high` (`CREDIBLE_LEVEL` credible
    interval of the mean, from the posterior: defined for every arm), `probability_best`,
    `expected_loss` (per impression, in the metric's unit).
    """
    metric = Metric(metric)
    kind = METRIC_KIND[metric]
    sums = Sums.of(stats, kind)
    prior = NormalPrior.pooled(sums) if kind is RewardKind.CONTINUOUS else None
    post = posteriors(sums, kind, prior)
    low, high = post.interval(CREDIBLE_LEVEL)
    rng = np.random.default_rng(rng_seed)
    # One set of joint draws serves both figures.
    draws = post.draw(rng, SAMPLES)
    p_best = dict(zip(sums.arms, share_best(draws, rng).tolist(), strict=True))
    loss = dict(zip(sums.arms, losses(draws).tolist(), strict=True))
    arms = [
        {
            "arm": s.arm,
            "impressions": int(s.impressions),
            "rewards": int(s.rewards),
            "mean": None if s.mean is None else float(s.mean),
            "ci_low": float(low[i]),
            "ci_high": float(high[i]),
            "probability_best": p_best[s.arm],
            "expected_loss": loss[s.arm],
        }
        for i, s in enumerate(stats)
    ]
    best = max(arms, key=lambda a: (a["probability_best"], -a["expected_loss"]))
    return {
        "metric": str(metric),
        "level": CREDIBLE_LEVEL,
        "arms": arms,
        "best_arm": best["arm"],
        "recommendation": recommendation(stats, metric, best),
    }


def experiment_report(store: RewardStore, name: str) -> dict:
    """`report` of the stored experiment `name`, with its name and policy: what
    `contentml experiments report --json` prints and `GET /v1/experiments/{name}` answers."""
    experiment = store.experiment(name)
    summary = report(store.stats_of(experiment), experiment.metric)
    return {"experiment": experiment.name, "policy": experiment.policy.value, **summary}


def recommendation(stats: Sequence[ArmStats], metric: Metric, best: dict) -> str:
    """`stop: ...` or `continue: ...` for the best arm's figures, by the module docstring's rule."""
    total = sum(s.rewards for s in stats)
    if total < MIN_REWARDS:
        return f"continue: not enough data ({total} of the {MIN_REWARDS} rewards needed)"
    if best["mean"] is None:
        return f"continue: {best['arm']} leads on its prior alone: it has no rewards yet"
    threshold = max(LOSS_TOLERANCE * abs(best["mean"]), LOSS_FLOOR[Metric(metric)])
    arm, p, loss = best["arm"], best["probability_best"], best["expected_loss"]
    if p >= STOP_PROBABILITY and loss < threshold:
        return f"stop: {arm} is best with p={p:.3f} (expected loss {loss:.3g} < {threshold:.3g})"
    return (
        f"continue: {arm} leads with p={p:.3f} and expected loss {loss:.3g}; stopping needs "
        f"p >= {STOP_PROBABILITY} and expected loss < {threshold:.3g}"
    )


def report_html(history: pd.DataFrame, metric: Metric, title: str, rng_seed: int = 0) -> str:
    """One self-contained HTML page (plotly's JS inline: the cluster has no internet): each
    arm's posterior mean and credible interval over time, cumulative, at `HISTORY_POINTS`
    evenly spaced points of the history, then the final `report` as a table.

    `history` has one row per reward, columns `timestamp`, `arm`, `reward`. It holds rewards
    only, so the table's `impressions` are the rewards counted (a lower bound). Without any
    reward the page says so (an experiment that just started is not an error).
    """
    metric = Metric(metric)
    kind = METRIC_KIND[metric]
    history = _checked_history(history, kind)
    if history.empty:
        return _page(title, "<p>No rewards reported yet.</p>")
    arms = tuple(str(arm) for arm in pd.unique(history["arm"]))
    codes = pd.Categorical(history["arm"].astype(str), categories=arms).codes
    rewards = history["reward"].to_numpy(dtype=np.float64)
    points = np.unique(np.linspace(0, len(history) - 1, HISTORY_POINTS).round().astype(int))
    # Each arm's running sums, kept only at the plotted rows: shape (points, arms).
    shape = (len(points), len(arms))
    counts, sums, squares = np.empty(shape), np.empty(shape), np.empty(shape)
    for i in range(len(arms)):
        mine = rewards * (codes == i)
        counts[:, i] = np.cumsum(codes == i)[points]
        sums[:, i] = np.cumsum(mine)[points]
        squares[:, i] = np.cumsum(mine * rewards)[points]

    means, lows, highs = [], [], []
    for row in range(len(points)):
        post = posteriors(Sums(arms, counts[row], sums[row], squares[row]), kind)
        low, high = post.interval(CREDIBLE_LEVEL)
        means.append(post.mean())
        lows.append(low)
        highs.append(high)
    times = history["timestamp"].iloc[points].tolist()

    figure = go.Figure()
    palette = qualitative.Plotly
    for i, arm in enumerate(arms):
        red, green, blue = hex_to_rgb(palette[i % len(palette)])
        low, high = [v[i] for v in lows], [v[i] for v in highs]
        figure.add_trace(
            go.Scatter(
                x=times + times[::-1],
                y=high + low[::-1],
                fill="toself",
                fillcolor=f"rgba({red},{green},{blue},0.2)",
                line={"width": 0},
                hoverinfo="skip",
                legendgroup=arm,
                showlegend=False,
                name=f"{arm} {CREDIBLE_LEVEL:.0%} interval",
            )
        )
        figure.add_trace(
            go.Scatter(
                x=times,
                y=[v[i] for v in means],
                mode="lines",
                line={"color": f"rgb({red},{green},{blue})"},
                legendgroup=arm,
                name=arm,
            )
        )
    figure.update_layout(
        title=title,
        xaxis_title="time",
        yaxis_title=f"{metric}: posterior mean, {CREDIBLE_LEVEL:.0%} credible interval",
        template="plotly_white",
    )

    final = [
        ArmStats(arm, int(counts[-1, i]), int(counts[-1, i]), sums[-1, i], squares[-1, i])
        for i, arm in enumerate(arms)
    ]
    summary = report(final, metric, rng_seed)
    plot = figure.to_html(full_html=False, include_plotlyjs=True)
    return _page(title, plot + _table(summary))


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def _checked_history(history: pd.DataFrame, kind: RewardKind) -> pd.DataFrame:
    missing = [c for c in HISTORY_COLUMNS if c not in history.columns]
    if missing:
        raise UserError(f"history is missing columns {missing}; it needs {list(HISTORY_COLUMNS)}")
    reward = pd.to_numeric(history["reward"], errors="coerce")
    if not np.isfinite(reward.to_numpy(dtype=np.float64)).all():
        raise UserError("history has a missing, non-numeric or infinite reward")
    if kind is RewardKind.RATE and ((reward < 0) | (reward > 1)).any():
        raise UserError("history of a rate metric has a reward outside [0, 1]")
    return history.assign(reward=reward).sort_values("timestamp", kind="stable")


def _table(summary: dict) -> str:
    columns = ("impressions", "rewards", "mean", "ci_low", "ci_high")
    columns += ("probability_best", "expected_loss")
    head = "".join(f"<th>{c}</th>" for c in ("arm", *columns))
    rows = "".join(
        f"<tr><th>{html.escape(figures['arm'])}</th>"
        + "".join(f"<td>{_cell(figures[c])}</td>" for c in columns)
        + "</tr>"
        for figures in summary["arms"]
    )
    return (
        f"<h2>Final posteriors ({summary['metric']})</h2><table><tr>{head}</tr>{rows}</table>"
        f"<p>Best arm: <b>{html.escape(summary['best_arm'])}</b>. "
        f"Recommendation: <b>{html.escape(summary['recommendation'])}</b></p>"
    )


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
