"""`contentml providers status`: the script providers' usage against their quotas, keys by
index, rate-limit errors, answer times and the recommended generation rate."""

from __future__ import annotations

import argparse

from contentml.settings import Settings
from entrypoints.cli.base import OneLineParser, print_json


def cmd_providers_status(settings: Settings, args: argparse.Namespace) -> int:
    from serving.caller.provider_monitor import ProviderMonitor

    monitor = ProviderMonitor.from_settings(settings)
    try:
        status = monitor.status()
    finally:
        monitor.close()
    if args.json:
        print_json(status)
        return 0
    for p in status["providers"]:
        quota = (
            f"{p['requests_today']} of {p['daily_quota']} requests ({p['quota_used']:.0%})"
            if p["daily_quota"]
            else f"{p['requests_today']} requests, no quota"
        )
        p50 = "-" if p["p50_seconds"] is None else f"{p['p50_seconds']:.2f} s"
        normal = "-" if p["normal_p50_seconds"] is None else f"{p['normal_p50_seconds']:.2f} s"
        print(
            f"{p['name']}: {quota}; keys {len(p['keys_available'])} available "
            f"{p['keys_limited']} limited; {p['rate_limit_errors_last_hour']} rate-limit errors "
            f"in the last hour; p50 {p50} (normal {normal})"
        )
        if p["skipped"]:
            print(f"  SKIPPED until {p['skipped_until']}: {p['skip_reason']}")
    capacity = status["capacity"]
    print(f"generation rate {capacity['rate']:g}: {capacity['reason']}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `providers` command group."""
    providers = commands.add_parser(
        "providers", help="script providers: quota, keys, errors, answer times, capacity"
    )
    actions = providers.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    status = actions.add_parser(
        "status", help="usage against quota, keys by index, rate-limit errors, p50 vs normal"
    )
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_providers_status)
