"""`contentml optimize`: Optuna's channel-settings optimization."""

from __future__ import annotations

import argparse
from pathlib import Path

from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    print_json,
)


def cmd_optimize_suggest(settings: Settings, args: argparse.Namespace) -> int:
    from training.revenue.channel_settings import load_space, suggest

    _quiet_optuna()
    space = load_space(Path(args.space)) if args.space else None
    print_json(suggest(settings, args.study, space))
    return 0


def cmd_optimize_tell(settings: Settings, args: argparse.Namespace) -> int:
    from training.revenue.channel_settings import tell

    _quiet_optuna()
    print_json(tell(settings, args.study, args.trial, args.value))
    return 0


def cmd_optimize_best(settings: Settings, args: argparse.Namespace) -> int:
    from training.revenue.channel_settings import best

    _quiet_optuna()
    print_json(best(settings, args.study))
    return 0


def _quiet_optuna() -> None:
    import optuna

    # One INFO line per trial: hundreds per run. The summary line says what matters.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def register(commands: argparse._SubParsersAction) -> None:
    """The `optimize` command."""
    optimize = commands.add_parser(
        "optimize", help="Bayesian optimization of channel settings (GP sampler, ask/tell)"
    )
    optimize_commands = optimize.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    optimize_suggest = optimize_commands.add_parser(
        "suggest", help="start a trial: the channel settings to put live next"
    )
    optimize_suggest.add_argument("--study", required=True, help="letters, digits, - and _")
    optimize_suggest.add_argument(
        "--space", default=None, help="search space YAML for a new study (default: packaged)"
    )
    optimize_suggest.set_defaults(handler=cmd_optimize_suggest)
    optimize_tell = optimize_commands.add_parser("tell", help="report a running trial's outcome")
    optimize_tell.add_argument("--study", required=True)
    optimize_tell.add_argument("--trial", type=int, required=True)
    optimize_tell.add_argument("--value", type=float, required=True, help="e.g. the day's RPM")
    optimize_tell.set_defaults(handler=cmd_optimize_tell)
    optimize_best = optimize_commands.add_parser("best", help="the best finished trial")
    optimize_best.add_argument("--study", required=True)
    optimize_best.set_defaults(handler=cmd_optimize_best)
