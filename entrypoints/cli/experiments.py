"""`contentml experiments`: the RevenueOptimizer's experiments."""

from __future__ import annotations

import argparse
from pathlib import Path

from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    print_json,
)


def cmd_experiments_list(settings: Settings, args: argparse.Namespace) -> int:
    from training.revenue.store import RewardStore

    rows = [e.to_dict() for e in RewardStore(settings.revenue_store).all()]
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            print(f"{row['name']}\t{row['metric']}\t{row['policy']}\t{','.join(row['arms'])}")
    return 0


def cmd_experiments_report(settings: Settings, args: argparse.Namespace) -> int:
    from training.revenue.report import experiment_report, report_html
    from training.revenue.store import RewardStore

    store = RewardStore(settings.revenue_store)
    summary = experiment_report(store, args.experiment)
    if args.html:
        page = report_html(store.history(args.experiment), summary["metric"], args.experiment)
        Path(args.html).write_text(page, encoding="utf-8")
    if args.json:
        print_json(summary)
        return 0
    print(f"{summary['experiment']}: {summary['metric']}, {summary['policy']}")
    print("arm\timpressions\trewards\tmean [95% CI]\tP(best)\texpected loss")
    for arm in summary["arms"]:
        mean = "-" if arm["mean"] is None else f"{arm['mean']:.4g}"
        interval = f"[{arm['ci_low']:.4g}, {arm['ci_high']:.4g}]"
        print(
            f"{arm['arm']}\t{arm['impressions']}\t{arm['rewards']}\t{mean} {interval}\t"
            f"{arm['probability_best']:.3f}\t{arm['expected_loss']:.4g}"
        )
    print(summary["recommendation"])
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `experiments` command."""
    experiments = commands.add_parser(
        "experiments", help="RevenueOptimizer's bandit experiments (A/B/n tests)"
    )
    experiments_commands = experiments.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    experiments_list = experiments_commands.add_parser("list", help="every experiment")
    experiments_list.add_argument("--json", action="store_true")
    experiments_list.set_defaults(handler=cmd_experiments_list)
    experiments_report = experiments_commands.add_parser(
        "report", help="per arm: mean, 95%% interval, P(best), expected loss; stop or continue"
    )
    experiments_report.add_argument("experiment")
    experiments_report.add_argument("--json", action="store_true")
    experiments_report.add_argument(
        "--html", default=None, help="also write the page with the posteriors over time"
    )
    experiments_report.set_defaults(handler=cmd_experiments_report)
