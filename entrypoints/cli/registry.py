"""`contentml models / status / promote / rollback / history`: the registered models, their
aliases and what they serve."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from contentml.names import Alias
from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    UsageError,
    model_name,
    positive_int,
    print_json,
)


def cmd_models_list(settings: Settings, args: argparse.Namespace) -> int:
    from contentml import registry

    listing = registry.list_models(registry.connect(settings))
    if args.json:
        print_json(listing)
    else:
        for model in listing:
            aliases = ", ".join(f"{a}=v{v}" for a, v in model["aliases"].items()) or "no aliases"
            print(f"{model['name']}: {len(model['versions'])} versions ({aliases})")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints.status import model_status, status_lines

    statuses = model_status(settings, args.url)
    if args.json:
        print_json(statuses)
    else:
        print("\n".join(status_lines(statuses)) or "no registered models yet: run `make demo`")
    return 0


def cmd_promote(settings: Settings, args: argparse.Namespace) -> int:
    from contentml import registry

    if args.force and not args.reason:
        raise UsageError("promote: --force needs --reason TEXT, which the history keeps")
    event = registry.promote(
        registry.connect(settings),
        args.model,
        args.version,
        Alias(args.to),
        reason=args.reason or "manual promotion",
        force=args.force,
    )
    print_json(asdict(event))
    return 0


def cmd_rollback(settings: Settings, args: argparse.Namespace) -> int:
    from contentml import registry

    from_version = None if args.from_version is None else str(args.from_version)
    try:
        event = registry.rollback(
            registry.connect(settings), args.model, reason=args.reason, from_version=from_version
        )
    except registry.AlreadyRolledBack as e:
        # A re-run of a rollback that completed: success, and the event that did it.
        print(f"contentml: {e}", file=sys.stderr)
        event = e.event
    print_json(asdict(event))
    return 0


def cmd_history(settings: Settings, args: argparse.Namespace) -> int:
    from contentml import registry

    events = registry.history(registry.connect(settings), args.model)
    if args.json:
        print_json([asdict(e) for e in events])
    else:
        for e in events:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
            print(
                f"{when} {e.alias}: v{e.from_version or '-'} -> v{e.to_version} "
                f"({e.action} by {e.actor}: {e.reason})"
            )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `models`, `status`, `promote`, `rollback`, `history` commands."""

    models = commands.add_parser("models", help="registered models")
    models_commands = models.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    listing = models_commands.add_parser("list", help="models, versions and aliases")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_models_list)
    status = commands.add_parser(
        "status", help="per model: champion, challenger, served, gate score, drift, last change"
    )
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--url", default=None, help="the model server to ask (default: CONTENTML_SERVING_URL)"
    )
    status.set_defaults(handler=cmd_status)
    promote = commands.add_parser("promote", help="point an alias at a model version")
    promote.add_argument("model", type=model_name)
    promote.add_argument("version", type=positive_int)
    promote.add_argument("--to", choices=[a.value for a in Alias], default=Alias.CHAMPION.value)
    promote.add_argument("--reason", default=None, help="why, for the history")
    promote.add_argument(
        "--force",
        action="store_true",
        help="skip the champion checks (artifacts load, inputs match); needs --reason",
    )
    promote.set_defaults(handler=cmd_promote)
    rollback = commands.add_parser("rollback", help="champion back to the previous champion")
    rollback.add_argument("model", type=model_name)
    rollback.add_argument("--reason", default="manual rollback")
    rollback.add_argument(
        "--from",
        dest="from_version",
        type=positive_int,
        default=None,
        metavar="VERSION",
        help="only while VERSION is the champion: a re-run after it completed does nothing",
    )
    rollback.set_defaults(handler=cmd_rollback)
    history = commands.add_parser("history", help="every alias change of a model")
    history.add_argument("model", type=model_name)
    history.add_argument("--json", action="store_true")
    history.set_defaults(handler=cmd_history)
