"""`contentml manifests / deploy`: the Kubernetes manifests, and deploying registered versions to
KServe."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    UsageError,
    percent,
    write_yaml,
)


def cmd_manifests_check(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints import manifests

    failed = False
    for overlay in args.overlay or manifests.OVERLAYS:
        report = manifests.check(
            overlay, Path(args.schemas).resolve(), require_digests=args.require_digests
        )
        kinds = ", ".join(f"{kind} {count}" for kind, count in report.kinds.items())
        total = sum(report.kinds.values())
        for problem in report.problems:
            print(f"{overlay}: {problem}")
        if report.problems:
            failed = True
            print(f"{overlay}: {len(report.problems)} problems in {total} objects ({kinds})")
        else:
            print(f"{overlay}: {total} objects valid ({kinds})")
    return 1 if failed else 0


def cmd_deploy(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints import deploy

    if args.canary and (args.promote or args.rollback):
        raise UsageError("deploy: --canary renders a canary; --promote/--rollback end one")
    where = {"namespace": args.namespace, "overlay": args.overlay}
    if args.promote:
        event, manifest = deploy.promote(settings, args.model, args.mode, **where)
    elif args.rollback:
        event, manifest = deploy.rollback(settings, args.model, args.mode, **where)
    else:
        manifest = deploy.deploy_manifest(settings, args.model, args.canary, args.mode, **where)
        event = None
    if event is not None:
        print(json.dumps(asdict(event)), file=sys.stderr)
    write_yaml(manifest, args.output)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `manifests`, `deploy` commands."""
    manifests = commands.add_parser("manifests", help="the Kubernetes manifests (kustomize)")
    manifests_commands = manifests.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    manifests_check = manifests_commands.add_parser(
        "check", help="render each overlay and validate every object against its schema"
    )
    manifests_check.add_argument(
        "--overlay", action="append", help="dev or prod (repeatable); default: every overlay"
    )
    manifests_check.add_argument(
        "--schemas", default="../shared/schemas", help="folder of the KServe and Trainer CRDs"
    )
    manifests_check.add_argument(
        "--require-digests",
        action="store_true",
        help="every image pinned by digest (a release, once its images are pushed)",
    )
    manifests_check.set_defaults(handler=cmd_manifests_check)
    deploy = commands.add_parser(
        "deploy", help="render the KServe InferenceService of a model from its aliases"
    )
    deploy.add_argument("model", help="served model: trend, quality, niche, script")
    deploy.add_argument(
        "--canary", type=percent, default=0, help="challenger's share of traffic (%%)"
    )
    deploy.add_argument("--mode", choices=["serverless", "raw"], default="serverless")
    deploy.add_argument("--namespace", default=None)
    deploy.add_argument(
        "--overlay", default=None, help="shape as in manifests/overlays/OVERLAY (default: base)"
    )
    deploy.add_argument("--output", default=None, help="YAML file (default: stdout)")
    ending = deploy.add_mutually_exclusive_group()
    ending.add_argument("--promote", action="store_true", help="challenger becomes champion")
    ending.add_argument("--rollback", action="store_true", help="champion back to the previous")
    deploy.set_defaults(handler=cmd_deploy)
