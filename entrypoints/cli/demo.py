"""`contentml demo`: every model family at a demo budget, then serve and call each."""

from __future__ import annotations

import argparse

from contentml.names import comma_list
from contentml.settings import Settings
from entrypoints.cli.base import (
    positive_int,
    print_json,
)


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints.demo import run_demo

    families = comma_list(args.families)
    retrain = families if args.retrain == ALL_FAMILIES else comma_list(args.retrain or "")
    summary = run_demo(settings, args.max_series, retrain, families)
    print_json(summary)
    return 0


ALL_FAMILIES = "all"
"""`--retrain` given alone: every family of the demo."""


def register(commands: argparse._SubParsersAction) -> None:
    """The `demo` command."""
    demo = commands.add_parser(
        "demo", help="every model family's pipeline at a demo budget, then serve and call each"
    )
    demo.add_argument(
        "--max-series", type=positive_int, default=12, help="trend series to train on"
    )
    demo.add_argument(
        "--retrain",
        nargs="?",
        const=ALL_FAMILIES,
        metavar="FAMILIES",
        help="train new versions even where champions exist: of every family, or of the "
        "comma-separated ones given (the others reuse their champions)",
    )
    demo.add_argument(
        "--families",
        default="trend,quality,niche,script,revenue",
        help="comma-separated model families to train, serve and call (default: all five)",
    )
    demo.set_defaults(handler=cmd_demo)
