"""`contentml features`: the Feast feature store's server."""

from __future__ import annotations

import argparse

from contentml.errors import UserError
from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    port_number,
    positive_int,
)


def cmd_features_serve(settings: Settings, args: argparse.Namespace) -> int:
    from serving.admission import is_loopback

    if not is_loopback(args.host) and not args.insecure:
        # Feast's server checks no token, and its /push writes features.
        raise UserError(
            f"refusing to serve the feature store on {args.host}: Feast's server checks no "
            "token. Keep --host 127.0.0.1, or pass --insecure where a network policy admits "
            "only the platform's pods"
        )
    from contentml.features import serve_features  # after the check: Feast takes seconds

    serve_features(settings, args.host, args.port, args.workers)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `features` command."""
    features = commands.add_parser("features", help="the Feast feature store")
    features_commands = features.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    features_serve = features_commands.add_parser(
        "serve", help="Feast's feature server (HTTP) over the configured online store"
    )
    features_serve.add_argument("--host", default="127.0.0.1")
    features_serve.add_argument(
        "--insecure",
        action="store_true",
        help="listen beyond loopback, though Feast's server checks no token",
    )
    features_serve.add_argument("--port", type=port_number, default=6566)
    features_serve.add_argument("--workers", type=positive_int, default=1)
    features_serve.set_defaults(handler=cmd_features_serve)
