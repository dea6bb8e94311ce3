"""`contentml serve / api / auth-proxy`: the servers (every champion on KServe, the backend API
alone, the script endpoint's token check)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from contentml.settings import Settings
from entrypoints.cli.base import (
    count_int,
    model_names,
    port_number,
)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from serving.admission import bind_host

    # Refused before the server's imports (seconds: torch, MLflow), so a refusal is instant.
    host = bind_host(settings, args.host, args.insecure)
    from serving.server import parse_canary, serve

    if "CONTENTML_SERVING_URL" not in os.environ:
        # The script route's self-hosted provider is this server, on the port it listens on.
        settings = replace(settings, serving_url=f"http://{_local_address(host)}:{args.port}")
    serve(
        settings,
        host,
        args.port,
        args.models,
        canary=parse_canary(args.canary),
        workers=args.workers,
    )
    return 0


def _local_address(host: str) -> str:
    """Where this machine reaches a server listening on `host`, as a URL's host."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 (every interface, loopback among them)
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    from serving.admission import bind_host

    host = bind_host(settings, args.host, args.insecure)
    from serving.server import serve_api

    serve_api(settings, host, args.port)
    return 0


def cmd_auth_proxy(settings: Settings, args: argparse.Namespace) -> int:
    from serving.auth_proxy import run_auth_proxy

    run_auth_proxy(settings, args.predictor_host, args.http_port)
    return 0


def _add_bind_arguments(parser: argparse.ArgumentParser) -> None:
    """`--port`, `--host` and `--insecure`, the same for every server."""
    parser.add_argument("--port", type=port_number, default=8080)
    parser.add_argument(
        "--host",
        default=None,
        help="address to listen on (default: every interface with CONTENTML_API_TOKEN set, "
        "127.0.0.1 without)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="listen beyond loopback without a token: anyone who reaches the port may call "
        "every route",
    )


def register(commands: argparse._SubParsersAction) -> None:
    """The `serve`, `api`, `auth-proxy` commands."""
    serve = commands.add_parser("serve", help="serve every champion model with KServe")
    _add_bind_arguments(serve)
    serve.add_argument(
        "--models", type=model_names, default=None, help="comma-separated model names"
    )
    serve.add_argument(
        "--canary",
        action="append",
        default=[],
        metavar="MODEL=PERCENT",
        help="send PERCENT %% of MODEL's requests to its challenger (repeatable)",
    )
    serve.add_argument(
        "--workers",
        type=count_int,
        default=1,
        help="batch workers to start beside the server (with every model served; 0: none)",
    )
    serve.set_defaults(handler=cmd_serve)
    api = commands.add_parser(
        "api", help="the backend API alone: /generate/script, /batch (the cluster's API pods)"
    )
    _add_bind_arguments(api)
    api.set_defaults(handler=cmd_api)

    # KServe starts a transformer with these arguments (`--model_name`, `--predictor_host`,
    # `--http_port`), appended to the container's own.
    auth_proxy = commands.add_parser(
        "auth-proxy",
        help="the bearer-token check in front of a predictor that has none (the script "
        "InferenceService's transformer)",
    )
    auth_proxy.add_argument(
        "--predictor_host", required=True, help="HOST[:PORT] of the predictor to forward to"
    )
    auth_proxy.add_argument("--http_port", type=port_number, default=8080)
    auth_proxy.add_argument(
        "--model_name", default=None, help="the InferenceService's name (KServe passes it)"
    )
    auth_proxy.set_defaults(handler=cmd_auth_proxy)
