"""`contentml drift / monitor`: drift checks and the retraining trigger."""

from __future__ import annotations

import argparse
from pathlib import Path

from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    model_name,
    print_json,
)


def cmd_drift_check(settings: Settings, args: argparse.Namespace) -> int:
    from monitoring.drift import run_drift_check

    result = run_drift_check(settings, Path(args.reference), Path(args.current), args.model)
    summary = {key: result[key] for key in ("drift_share", "drifted", "features", "report")}
    if args.json:
        print_json(summary)
    else:
        state = "DRIFTED" if summary["drifted"] else "no drift"
        print(f"{state}: {summary['drift_share']:.0%} of features drifted; {summary['report']}")
    return 0  # drift is a finding, not a failure


def cmd_monitor_check(settings: Settings, args: argparse.Namespace) -> int:
    from contentml.launch import launch_pipeline
    from monitoring.drift import run_drift_check
    from monitoring.retrain import check_window

    drift = run_drift_check(settings, Path(args.reference), Path(args.current), args.model)
    result = check_window(
        settings,
        args.model,
        args.window or "",
        Path(args.current),
        drift["drift_share"],
        args.current_metric,
        drift_run_id=drift["run_id"],
        launch=launch_pipeline,
    )
    print_json({**result, "report": drift["report"]})
    return 0


def cmd_monitor_triggers(settings: Settings, args: argparse.Namespace) -> int:
    from monitoring.retrain import trigger_records

    print_json([record.to_dict() for record in trigger_records(settings, args.model)])
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `drift`, `monitor` commands."""
    drift = commands.add_parser("drift", help="data drift between two windows (Evidently)")
    drift_commands = drift.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    drift_check = drift_commands.add_parser(
        "check", help="share of drifted features, per-feature results, HTML report"
    )
    drift_check.add_argument(
        "--model", default=None, help="compare this model's inputs (default: shared columns)"
    )
    drift_check.add_argument("--reference", required=True, help="CSV or parquet: the baseline")
    drift_check.add_argument("--current", required=True, help="CSV or parquet: the new window")
    drift_check.add_argument("--json", action="store_true")
    drift_check.set_defaults(handler=cmd_drift_check)
    monitor = commands.add_parser("monitor", help="drift and performance checks, retraining")
    monitor_commands = monitor.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    monitor_check = monitor_commands.add_parser(
        "check", help="drift check, then retrain the model once per drifted window"
    )
    monitor_check.add_argument(
        "--model", type=model_name, required=True, help="registered model, e.g. quality"
    )
    monitor_check.add_argument("--reference", required=True, help="CSV or parquet: the baseline")
    monitor_check.add_argument("--current", required=True, help="CSV or parquet: the new window")
    monitor_check.add_argument(
        "--window", default=None, help="window id (default: a hash of the current file)"
    )
    monitor_check.add_argument(
        "--current-metric", type=float, default=None, help="the model's metric on the window"
    )
    monitor_check.set_defaults(handler=cmd_monitor_check)
    monitor_triggers = monitor_commands.add_parser("triggers", help="retraining triggers fired")
    monitor_triggers.add_argument("--model", type=model_name, default=None)
    monitor_triggers.set_defaults(handler=cmd_monitor_triggers)
