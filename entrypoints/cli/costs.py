"""`contentml costs`: what calls and jobs cost, per channel and day."""

from __future__ import annotations

import argparse

from contentml.settings import Settings
from entrypoints.cli.base import (
    iso_date,
    print_json,
)


def cmd_costs(settings: Settings, args: argparse.Namespace) -> int:
    from serving.backend.costs import CostLedger

    ledger = CostLedger.from_settings(settings)
    try:
        days = ledger.summary(channel=args.channel, since=args.since, until=args.until)
        alert = ledger.alert()
    finally:
        ledger.close()
    if args.json:
        print_json({"days": days, "alert": alert})
        return 0
    for day in days:
        per_video = "" if day["usd_per_video"] is None else f", ${day['usd_per_video']:.4f}/video"
        print(
            f"{day['day']}  {day['channel']}: ${day['usd']:.4f} ({day['calls']} calls{per_video})"
        )
    if alert["firing"]:
        print(f"ALERT: {alert['streak']} videos in a row cost more than ${alert['budget_usd']:.2f}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `costs` command."""
    costs = commands.add_parser(
        "costs", help="what scripts and batch jobs cost, per channel and day"
    )
    costs.add_argument("--channel", default=None)
    costs.add_argument("--since", type=iso_date, default=None, help="first day, YYYY-MM-DD")
    costs.add_argument("--until", type=iso_date, default=None, help="last day, YYYY-MM-DD")
    costs.add_argument("--json", action="store_true")
    costs.set_defaults(handler=cmd_costs)
