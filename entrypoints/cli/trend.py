"""`contentml trend`: the trend forecaster."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    positive_int,
    print_json,
)


def cmd_trend_backtest(settings: Settings, args: argparse.Namespace) -> int:
    from training.trend.backtest import run_backtest

    started = time.monotonic()
    run_backtest(Path(args.train), args.horizon, Path(args.output), workers=args.workers)
    print_json({"output": args.output, "seconds": round(time.monotonic() - started, 1)})
    return 0


def cmd_trend_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from training.trend.backtest import holdout_report

    train = Path(args.train) if args.train else settings.data_dir / "m4-hourly" / "Hourly-train.csv"
    started = time.monotonic()
    report = holdout_report(train, args.horizon, workers=args.workers, limit=args.limit)
    print_json(report | {"seconds": round(time.monotonic() - started, 1)})
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `trend` command."""
    trend = commands.add_parser("trend", help="the trend forecaster")
    trend_commands = trend.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    backtest = trend_commands.add_parser(
        "backtest", help="fit every series of an M4-format CSV and write its forecasts"
    )
    backtest.add_argument("--train", required=True, help="M4 wide CSV: id, then values")
    backtest.add_argument("--horizon", type=positive_int, default=48)
    backtest.add_argument("--output", required=True, help="forecasts CSV, M4 format")
    backtest.add_argument("--workers", type=positive_int, default=2)
    backtest.set_defaults(handler=cmd_trend_backtest)
    evaluate = trend_commands.add_parser(
        "evaluate",
        help="hold out the last horizon of every series of an M4-format CSV, fit on the rest, "
        "and print the holdout scores of the ensemble, each member and the baselines as JSON",
    )
    evaluate.add_argument(
        "--train", help="M4 wide CSV (default: the M4 hourly training file in the data folder)"
    )
    evaluate.add_argument("--horizon", type=positive_int, default=48)
    evaluate.add_argument("--limit", type=positive_int, help="only the first LIMIT series")
    evaluate.add_argument("--workers", type=positive_int, default=2)
    evaluate.set_defaults(handler=cmd_trend_evaluate)
