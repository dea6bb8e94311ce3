"""`contentml pipeline`: compile, run and schedule the KFP pipelines."""

from __future__ import annotations

import argparse
from pathlib import Path

from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    UsageError,
    print_json,
)


def cmd_pipeline_compile(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints import runner

    for path in runner.compile_all(Path(args.output_dir)):
        print(path)
    return 0


def cmd_pipeline_run(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints import runner

    arguments = runner.parse_arguments(args.name, args.param)
    if args.local:
        print_json(runner.run_local(settings, args.name, arguments))
    elif settings.kfp_host:
        print_json(
            {"run_id": runner.submit(settings, args.name, arguments), "host": settings.kfp_host}
        )
    else:
        raise UsageError("pipeline run: pass --local, or set KFP_HOST to run on the cluster")
    return 0


def cmd_pipeline_schedule(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints import runner

    runs = runner.load_schedules(Path(args.file))
    print_json(runner.schedule(settings, runs, args.experiment))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `pipeline` command."""
    pipeline = commands.add_parser("pipeline", help="compile or run KFP pipelines")
    pipeline_commands = pipeline.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    compile_ = pipeline_commands.add_parser("compile", help="write pipeline YAML for the KFP UI")
    compile_.add_argument("--output-dir", default=str(Path("pipelines") / "compiled"))
    compile_.set_defaults(handler=cmd_pipeline_compile)
    run = pipeline_commands.add_parser("run", help="run a pipeline locally or on the cluster")
    run.add_argument("name")
    run.add_argument("--local", action="store_true", help="run with kfp.local on this machine")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    run.set_defaults(handler=cmd_pipeline_run)
    schedule = pipeline_commands.add_parser(
        "schedule", help="make the cluster KFP's recurring runs match a schedules YAML"
    )
    schedule.add_argument("file", help="e.g. manifests/base/pipelines/schedules.yaml")
    schedule.add_argument("--experiment", default="contentml")
    schedule.set_defaults(handler=cmd_pipeline_schedule)
