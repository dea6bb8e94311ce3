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
