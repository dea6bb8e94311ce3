"""`contentml`: the command line. Each command parses arguments and calls one library function;
each group of commands is a module here that registers its own (`register`)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from contentml.errors import UserError
from contentml.settings import Settings
from entrypoints.cli import (
    batch,
    cluster,
    costs,
    demo,
    experiments,
    features,
    llm,
    monitor,
    niche,
    optimize,
    pipeline,
    providers,
    quality,
    registry,
    review,
    serve,
    trend,
)
from entrypoints.cli.base import QUIET_ENVIRONMENT, USAGE_ERROR, OneLineParser, UsageError

GROUPS = (
    demo,
    pipeline,
    features,
    cluster,
    serve,
    batch,
    costs,
    providers,
    registry,
    trend,
    quality,
    review,
    niche,
    optimize,
    llm,
    experiments,
    monitor,
)
"""The command modules, in the order `contentml --help` lists their commands."""


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="contentml", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Library INFO chatter (database migrations, registry refreshes) is not the user's news.
    for library in ("mlflow", "feast", "alembic"):
        logging.getLogger(library).setLevel(logging.WARNING)
    # Download and weight-loading progress bars: noise in logs and in a pipeline task.
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # MLflow's own use of a deprecated SQLAlchemy option: a note for MLflow, not for users.
    warnings.filterwarnings("ignore", message="The ``noload`` loader strategy is deprecated")
    # Lightning's own use of a deprecated torch API, likewise.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # scipy falls back from KS's exact p-value on large drift windows: a note, not a problem.
    warnings.filterwarnings("ignore", message="ks_2samp: Exact calculation unsuccessful")
    try:
        args = build_parser().parse_args(argv)
        return args.handler(Settings.from_env(), args)
    except (UsageError, UserError) as e:
        print(f"contentml: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except RuntimeError as e:
        # Failures of a run (a pipeline task, the model server) that were already logged.
        print(f"contentml: failed: {e}", file=sys.stderr)
        return 1
