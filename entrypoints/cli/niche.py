"""`contentml niche`: AutoML models per niche."""

from __future__ import annotations

import argparse

from contentml.names import comma_list
from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    minutes,
    print_json,
)


def _quiet_optuna() -> None:
    import optuna

    # One INFO line per trial: hundreds per run. The summary line says what matters.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def cmd_niche_automl(settings: Settings, args: argparse.Namespace) -> int:
    from training.niche.automl import run_automl

    _quiet_optuna()
    niches = comma_list(args.niches) if args.niches else None
    print_json(run_automl(settings, args.budget_minutes, niches))
    return 0


def cmd_niche_adapt(settings: Settings, args: argparse.Namespace) -> int:
    from training.niche.automl import run_automl

    _quiet_optuna()
    print_json(run_automl(settings, args.budget_minutes, [args.niche]))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `niche` command."""
    niche = commands.add_parser("niche", help="AutoML models per niche")
    niche_commands = niche.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    automl = niche_commands.add_parser(
        "automl", help="search, register and gate a model per niche and the global model"
    )
    automl.add_argument("--budget-minutes", type=minutes, required=True)
    automl.add_argument("--niches", default=None, help="comma-separated niche names or slugs")
    automl.set_defaults(handler=cmd_niche_automl)
    adapt = niche_commands.add_parser(
        "adapt", help="one niche, warm-started from the global study's best trials"
    )
    adapt.add_argument("--niche", required=True, help="niche name or slug")
    adapt.add_argument("--budget-minutes", type=minutes, default=5.0)
    adapt.set_defaults(handler=cmd_niche_adapt)
