"""`contentml`: the command line. Each command parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from contentml.errors import UserError
from contentml.protocol import Task
from contentml.settings import Settings

QUIET_ENVIRONMENT = {
    # mlflow sets its own logger's level on import, so only this setting quiets its INFO lines.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}

USAGE_ERROR = 2
"""Exit status for bad arguments or requests, as argparse uses."""


class UsageError(Exception):
    """Bad arguments: reported on one line with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message}")


def _print_json(value) -> None:
    print(json.dumps(value, indent=None, default=str))


def _write_yaml(manifest: dict, output: str | None) -> None:
    """A manifest as `kubectl apply -f` reads it, to the file `output` or stdout."""
    import yaml

    text = yaml.safe_dump(manifest, sort_keys=False)
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        print(text, end="")


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints.demo import run_demo

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    summary = run_demo(settings, args.max_series, args.retrain, families)
    _print_json(summary)
    return 0


def cmd_pipeline_compile(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints import runner

    for path in runner.compile_all(Path(args.output_dir)):
        print(path)
    return 0


def cmd_pipeline_run(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints import runner

    arguments = runner.parse_arguments(args.name, args.param)
    if args.local:
        _print_json(runner.run_local(settings, args.name, arguments))
    elif settings.kfp_host:
        _print_json(
            {"run_id": runner.submit(settings, args.name, arguments), "host": settings.kfp_host}
        )
    else:
        raise UsageError("pipeline run: pass --local, or set KFP_HOST to run on the cluster")
    return 0


def cmd_pipeline_schedule(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints import runner

    runs = runner.load_schedules(Path(args.file))
    _print_json(runner.schedule(settings, runs, args.experiment))
    return 0


def cmd_features_serve(settings: Settings, args: argparse.Namespace) -> int:
    from contentml.features import serve_features

    serve_features(settings, args.host, args.port, args.workers)
    return 0


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


def cmd_optimize_suggest(settings: Settings, args: argparse.Namespace) -> int:
    from training.revenue.channel_settings import load_space, suggest

    _quiet_optuna()
    space = load_space(Path(args.space)) if args.space else None
    _print_json(suggest(settings, args.study, space))
    return 0


def cmd_optimize_tell(settings: Settings, args: argparse.Namespace) -> int:
    from training.revenue.channel_settings import tell

    _quiet_optuna()
    _print_json(tell(settings, args.study, args.trial, args.value))
    return 0


def cmd_optimize_best(settings: Settings, args: argparse.Namespace) -> int:
    from training.revenue.channel_settings import best

    _quiet_optuna()
    _print_json(best(settings, args.study))
    return 0


def cmd_experiments_list(settings: Settings, args: argparse.Namespace) -> int:
    from training.revenue.store import RewardStore

    rows = [e.to_dict() for e in RewardStore(settings.revenue_store).all()]
    if args.json:
        _print_json(rows)
    else:
        for row in rows:
            print(f"{row['name']}\t{row['metric']}\t{row['policy']}\t{','.join(row['arms'])}")
    return 0


def cmd_experiments_report(settings: Settings, args: argparse.Namespace) -> int:
    from training.revenue.report import experiment_report, report_html
    from training.revenue.store import RewardStore

    store = RewardStore(settings.revenue_store)
    summary = experiment_report(store, args.experiment)
    if args.html:
        page = report_html(store.history(args.experiment), summary["metric"], args.experiment)
        Path(args.html).write_text(page, encoding="utf-8")
    if args.json:
        _print_json(summary)
        return 0
    print(f"{summary['experiment']}: {summary['metric']}, {summary['policy']}")
    print("arm\timpressions\trewards\tmean [95% CI]\tP(best)\texpected loss")
    for arm in summary["arms"]:
        mean = "-" if arm["mean"] is None else f"{arm['mean']:.4g}"
        interval = f"[{arm['ci_low']:.4g}, {arm['ci_high']:.4g}]"
        print(
            f"{arm['arm']}\t{arm['impressions']}\t{arm['rewards']}\t{mean} {interval}\t"
            f"{arm['probability_best']:.3f}\t{arm['expected_loss']:.4g}"
        )
    print(summary["recommendation"])
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from serving.admission import bind_host
    from serving.server import parse_canary, serve

    host = bind_host(settings, args.host, args.insecure)
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
    from serving.server import serve_api

    serve_api(settings, bind_host(settings, args.host, args.insecure), args.port)
    return 0


def cmd_auth_proxy(settings: Settings, args: argparse.Namespace) -> int:
    from serving.auth_proxy import run_auth_proxy

    run_auth_proxy(settings, args.predictor_host, args.http_port)
    return 0


def _add_bind_arguments(parser: argparse.ArgumentParser) -> None:
    """`--port`, `--host` and `--insecure`, the same for every server."""
    parser.add_argument("--port", type=_port, default=8080)
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


def _batch_items(path: str) -> list:
    """The items of a job file: a JSON list of items, or an object with `items`."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from e
    except ValueError as e:
        raise UserError(f"{path} is not JSON: {e}") from e
    items = raw.get("items") if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise UserError(f"{path} must hold a JSON list of items or an object with `items`")
    return items


def cmd_batch_submit(settings: Settings, args: argparse.Namespace) -> int:
    import pydantic

    from serving.backend.batch import BatchQueue, BatchRequest

    try:
        request = BatchRequest(
            items=_batch_items(args.file), priority=args.priority, channel=args.channel
        )
    except pydantic.ValidationError as e:
        raise UserError(f"{args.file}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from e
    queue = BatchQueue(settings)
    try:
        _print_json(queue.submit(Task(args.task), request).model_dump(mode="json"))
    finally:
        queue.close()
    return 0


def _read_jobs(settings: Settings, read):
    """`read(store)` on the batch job store, closed after."""
    from serving.backend.batch import JobStore

    store = JobStore(settings.backend_store)
    try:
        return read(store)
    finally:
        store.close()


def cmd_batch_status(settings: Settings, args: argparse.Namespace) -> int:
    report = _read_jobs(settings, lambda store: store.report(args.job_id))
    _print_json(report.model_dump(mode="json"))
    return 0


def cmd_batch_results(settings: Settings, args: argparse.Namespace) -> int:
    results = _read_jobs(settings, lambda store: store.results(args.job_id))
    _print_json([r.model_dump(mode="json") for r in results])
    return 0


def cmd_batch_worker(settings: Settings, args: argparse.Namespace) -> int:
    from serving.server import work

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work(settings, args.threads)
    return 0


def cmd_batch_dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    letters = _read_jobs(settings, lambda store: store.dead_letters(args.job))
    if args.json:
        _print_json([letter.model_dump(mode="json") for letter in letters])
    else:
        for letter in letters:
            print(f"{letter.job_id}  {letter.id}  {letter.error}")
    return 0


def cmd_batch_dlq_retry(settings: Settings, args: argparse.Namespace) -> int:
    from serving.backend.batch import BatchQueue

    if args.id and not args.job:
        raise UserError("--id needs --job: item ids are unique within a job")
    queue = BatchQueue(settings)
    try:
        count = queue.retry_dead_letters(args.job, args.id)
    finally:
        queue.close()
    _print_json({"requeued": count})
    return 0


def cmd_costs(settings: Settings, args: argparse.Namespace) -> int:
    from serving.backend.costs import CostLedger

    ledger = CostLedger.from_settings(settings)
    try:
        days = ledger.summary(channel=args.channel, since=args.since, until=args.until)
        alert = ledger.alert()
    finally:
        ledger.close()
    if args.json:
        _print_json({"days": days, "alert": alert})
        return 0
    for day in days:
        per_video = "" if day["usd_per_video"] is None else f", ${day['usd_per_video']:.4f}/video"
        print(
            f"{day['day']}  {day['channel']}: ${day['usd']:.4f} ({day['calls']} calls{per_video})"
        )
    if alert["firing"]:
        print(f"ALERT: {alert['streak']} videos in a row cost more than ${alert['budget_usd']:.2f}")
    return 0


def cmd_models_list(settings: Settings, args: argparse.Namespace) -> int:
    from contentml import registry

    listing = registry.list_models(registry.connect(settings))
    if args.json:
        _print_json(listing)
    else:
        for model in listing:
            aliases = ", ".join(f"{a}=v{v}" for a, v in model["aliases"].items()) or "no aliases"
            print(f"{model['name']}: {len(model['versions'])} versions ({aliases})")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from entrypoints.status import model_status, status_lines

    statuses = model_status(settings, args.url)
    if args.json:
        _print_json(statuses)
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
        registry.Alias(args.to),
        reason=args.reason or "manual promotion",
        force=args.force,
    )
    _print_json(asdict(event))
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
    _print_json(asdict(event))
    return 0


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
    _write_yaml(manifest, args.output)
    return 0


def cmd_drift_check(settings: Settings, args: argparse.Namespace) -> int:
    from monitoring.drift import run_drift_check

    result = run_drift_check(settings, Path(args.reference), Path(args.current), args.model)
    summary = {key: result[key] for key in ("drift_share", "drifted", "features", "report")}
    if args.json:
        _print_json(summary)
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
    _print_json({**result, "report": drift["report"]})
    return 0


def cmd_monitor_triggers(settings: Settings, args: argparse.Namespace) -> int:
    from monitoring.retrain import trigger_records

    _print_json([record.to_dict() for record in trigger_records(settings, args.model)])
    return 0


def cmd_history(settings: Settings, args: argparse.Namespace) -> int:
    from contentml import registry

    events = registry.history(registry.connect(settings), args.model)
    if args.json:
        _print_json([asdict(e) for e in events])
    else:
        for e in events:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
            print(
                f"{when} {e.alias}: v{e.from_version or '-'} -> v{e.to_version} "
                f"({e.action} by {e.actor}: {e.reason})"
            )
    return 0


def cmd_trend_backtest(settings: Settings, args: argparse.Namespace) -> int:
    from training.trend.backtest import run_backtest

    started = time.monotonic()
    run_backtest(Path(args.train), args.horizon, Path(args.output), workers=args.workers)
    _print_json({"output": args.output, "seconds": round(time.monotonic() - started, 1)})
    return 0


def cmd_llm_finetune(settings: Settings, args: argparse.Namespace) -> int:
    from training.llm.config import load_config
    from training.llm.train import finetune

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    config = load_config(Path(args.config), max_steps=args.max_steps)
    started = time.monotonic()
    summary = finetune(settings, config)
    if summary is not None:  # rank 0 reports; the other ranks of a TrainJob stay quiet
        _print_json({**summary, "seconds": round(time.monotonic() - started, 1)})
    return 0


def cmd_llm_trainjob(settings: Settings, args: argparse.Namespace) -> int:
    from training.llm.config import load_config
    from training.llm.trainjob import trainjob_manifest

    config = load_config(Path(args.config))
    manifest = trainjob_manifest(
        config, args.config, settings, args.name, args.namespace, suspend=args.suspend
    )
    _write_yaml(manifest, args.output)
    return 0


def cmd_quality_train(settings: Settings, args: argparse.Namespace) -> int:
    from training import steps
    from training.quality.config import load_config

    # Lightning sets its logger to INFO when imported (by `steps`): device and tip notices.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    config = load_config(
        Path(args.config) if args.config else None,
        epochs=args.epochs,
        max_train_rows=args.max_train_rows,
    )
    started = time.monotonic()
    result = steps.run_quality_training(
        settings,
        Path(args.data),
        config,
        args.model,
        args.margin,
        run_name=f"quality-cli-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    _print_json({**result, "seconds": round(time.monotonic() - started, 1)})
    return 0


def cmd_quality_predict(settings: Settings, args: argparse.Namespace) -> int:
    import pandas as pd

    from contentml import registry
    from training.data import load_texts
    from training.quality.train import predict_frame

    texts = load_texts(Path(args.input))
    client = registry.connect(settings)
    if args.version is None:
        version = registry.alias_version(client, args.model, registry.Alias.CHAMPION)
        if version is None:
            raise registry.RegistryError(
                f"model {args.model!r} has no champion: run `contentml quality train` first"
            )
    else:
        version = registry.model_version(client, args.model, str(args.version)).version
    started = time.monotonic()
    predictions = predict_frame(f"models:/{args.model}/{version}", texts["text"])
    pd.concat([texts.iloc[:, [0]], predictions], axis=1).to_csv(args.output, index=False)
    _print_json(
        {
            "output": args.output,
            "rows": len(texts),
            "model": args.model,
            "version": version,
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    return 0


def _quiet_optuna() -> None:
    import optuna

    # One INFO line per trial: hundreds per run. The summary line says what matters.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def cmd_niche_automl(settings: Settings, args: argparse.Namespace) -> int:
    from training.niche.automl import run_automl

    _quiet_optuna()
    niches = [n.strip() for n in args.niches.split(",") if n.strip()] if args.niches else None
    _print_json(run_automl(settings, args.budget_minutes, niches))
    return 0


def cmd_niche_adapt(settings: Settings, args: argparse.Namespace) -> int:
    from training.niche.automl import run_automl

    _quiet_optuna()
    _print_json(run_automl(settings, args.budget_minutes, [args.niche]))
    return 0


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of minutes: {text!r}") from None
    if not 0 < value <= 24 * 60:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1440, not {value}")
    return value


def _name(text: str) -> str:
    """A model name as `contentml.names` allows it, checked before anything opens the registry
    (which would create its database in a fresh home)."""
    from contentml import names

    try:
        return names.model_name(text)
    except UserError as e:  # a ValueError: argparse would print a generic message
        raise argparse.ArgumentTypeError(str(e)) from None


def _names(text: str) -> list[str]:
    return [_name(part.strip()) for part in text.split(",")]


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, not {port}")
    return port


def _percent(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole percent: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be within 0..100, not {value}")
    return value


def _at_least(minimum: int):
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


_positive = _at_least(1)
_count = _at_least(0)


def build_parser() -> argparse.ArgumentParser:
    from contentml.registry import Alias

    parser = OneLineParser(prog="contentml", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    demo = commands.add_parser(
        "demo", help="every model family's pipeline at a demo budget, then serve and call each"
    )
    demo.add_argument("--max-series", type=_positive, default=12, help="trend series to train on")
    demo.add_argument(
        "--retrain", action="store_true", help="train new versions even where champions exist"
    )
    demo.add_argument(
        "--families",
        default="trend,quality,niche,script,revenue",
        help="comma-separated model families to train, serve and call (default: all five)",
    )
    demo.set_defaults(handler=cmd_demo)

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

    features = commands.add_parser("features", help="the Feast feature store")
    features_commands = features.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    features_serve = features_commands.add_parser(
        "serve", help="Feast's feature server (HTTP) over the configured online store"
    )
    features_serve.add_argument("--host", default="127.0.0.1")
    features_serve.add_argument("--port", type=_port, default=6566)
    features_serve.add_argument("--workers", type=_positive, default=1)
    features_serve.set_defaults(handler=cmd_features_serve)

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

    serve = commands.add_parser("serve", help="serve every champion model with KServe")
    _add_bind_arguments(serve)
    serve.add_argument("--models", type=_names, default=None, help="comma-separated model names")
    serve.add_argument(
        "--canary",
        action="append",
        default=[],
        metavar="MODEL=PERCENT",
        help="send PERCENT %% of MODEL's requests to its challenger (repeatable)",
    )
    serve.add_argument(
        "--workers",
        type=_count,
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
    auth_proxy.add_argument("--http_port", type=_port, default=8080)
    auth_proxy.add_argument(
        "--model_name", default=None, help="the InferenceService's name (KServe passes it)"
    )
    auth_proxy.set_defaults(handler=cmd_auth_proxy)

    batch = commands.add_parser("batch", help="batch jobs: submit, follow, work, dead letters")
    batch_commands = batch.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    batch_submit = batch_commands.add_parser("submit", help="queue a job; prints its id")
    batch_submit.add_argument("task", choices=[task.value for task in Task])
    batch_submit.add_argument("file", help="JSON: a list of items, or an object with `items`")
    batch_submit.add_argument("--priority", choices=("bulk", "urgent"), default="bulk")
    batch_submit.add_argument("--channel", default=None, help="channel the cost is booked to")
    batch_submit.set_defaults(handler=cmd_batch_submit)
    batch_status = batch_commands.add_parser("status", help="a job's status and counts (JSON)")
    batch_status.add_argument("job_id")
    batch_status.set_defaults(handler=cmd_batch_status)
    batch_results = batch_commands.add_parser("results", help="a job's results (JSON)")
    batch_results.add_argument("job_id")
    batch_results.set_defaults(handler=cmd_batch_results)
    batch_worker = batch_commands.add_parser("worker", help="answer queued chunks until stopped")
    batch_worker.add_argument("--threads", type=_positive, default=1)
    batch_worker.set_defaults(handler=cmd_batch_worker)
    dlq = batch_commands.add_parser("dlq", help="the dead-letter queue")
    dlq_commands = dlq.add_subparsers(dest="dlq_action", required=True, parser_class=OneLineParser)
    dlq_list = dlq_commands.add_parser("list", help="dead-lettered items with their errors")
    dlq_list.add_argument("--job", default=None, help="only this job's items")
    dlq_list.add_argument("--json", action="store_true")
    dlq_list.set_defaults(handler=cmd_batch_dlq_list)
    dlq_retry = dlq_commands.add_parser("retry", help="queue dead-lettered items again")
    dlq_retry.add_argument("--job", default=None, help="only this job's items (default: all)")
    dlq_retry.add_argument("--id", action="append", default=[], help="only this item (repeatable)")
    dlq_retry.set_defaults(handler=cmd_batch_dlq_retry)

    costs = commands.add_parser(
        "costs", help="what scripts and batch jobs cost, per channel and day"
    )
    costs.add_argument("--channel", default=None)
    costs.add_argument("--since", type=_date, default=None, help="first day, YYYY-MM-DD")
    costs.add_argument("--until", type=_date, default=None, help="last day, YYYY-MM-DD")
    costs.add_argument("--json", action="store_true")
    costs.set_defaults(handler=cmd_costs)

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
    promote.add_argument("model", type=_name)
    promote.add_argument("version", type=_positive)
    promote.add_argument("--to", choices=[a.value for a in Alias], default=Alias.CHAMPION.value)
    promote.add_argument("--reason", default=None, help="why, for the history")
    promote.add_argument(
        "--force",
        action="store_true",
        help="skip the champion checks (artifacts load, inputs match); needs --reason",
    )
    promote.set_defaults(handler=cmd_promote)

    rollback = commands.add_parser("rollback", help="champion back to the previous champion")
    rollback.add_argument("model", type=_name)
    rollback.add_argument("--reason", default="manual rollback")
    rollback.add_argument(
        "--from",
        dest="from_version",
        type=_positive,
        default=None,
        metavar="VERSION",
        help="only while VERSION is the champion: a re-run after it completed does nothing",
    )
    rollback.set_defaults(handler=cmd_rollback)

    trend = commands.add_parser("trend", help="the trend forecaster")
    trend_commands = trend.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    backtest = trend_commands.add_parser(
        "backtest", help="fit every series of an M4-format CSV and write its forecasts"
    )
    backtest.add_argument("--train", required=True, help="M4 wide CSV: id, then values")
    backtest.add_argument("--horizon", type=_positive, default=48)
    backtest.add_argument("--output", required=True, help="forecasts CSV, M4 format")
    backtest.add_argument("--workers", type=_positive, default=2)
    backtest.set_defaults(handler=cmd_trend_backtest)

    quality = commands.add_parser("quality", help="the content quality gate")
    quality_commands = quality.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    quality_train = quality_commands.add_parser(
        "train", help="fine-tune, calibrate, register and gate the quality classifier"
    )
    quality_train.add_argument("--data", required=True, help="labelled CSV: id, class, tweet")
    quality_train.add_argument("--config", default=None, help="YAML of QualityConfig fields")
    quality_train.add_argument("--epochs", type=_positive, default=None)
    quality_train.add_argument("--max-train-rows", type=_positive, default=None)
    quality_train.add_argument(
        "--model", type=_name, default="quality", help="registered model name"
    )
    quality_train.add_argument(
        "--margin", type=float, default=0.0, help="weighted F1 to gain over the champion"
    )
    quality_train.set_defaults(handler=cmd_quality_train)
    quality_predict = quality_commands.add_parser(
        "predict", help="class and probabilities for every text of a CSV"
    )
    quality_predict.add_argument("--input", required=True, help="CSV: id, then tweet or text")
    quality_predict.add_argument("--output", required=True, help="CSV: id, class, probabilities")
    quality_predict.add_argument(
        "--model", type=_name, default="quality", help="registered model name"
    )
    quality_predict.add_argument(
        "--version", type=_positive, default=None, help="model version (default: champion)"
    )
    quality_predict.set_defaults(handler=cmd_quality_predict)

    niche = commands.add_parser("niche", help="AutoML models per niche")
    niche_commands = niche.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    automl = niche_commands.add_parser(
        "automl", help="search, register and gate a model per niche and the global model"
    )
    automl.add_argument("--budget-minutes", type=_minutes, required=True)
    automl.add_argument("--niches", default=None, help="comma-separated niche names or slugs")
    automl.set_defaults(handler=cmd_niche_automl)
    adapt = niche_commands.add_parser(
        "adapt", help="one niche, warm-started from the global study's best trials"
    )
    adapt.add_argument("--niche", required=True, help="niche name or slug")
    adapt.add_argument("--budget-minutes", type=_minutes, default=5.0)
    adapt.set_defaults(handler=cmd_niche_adapt)

    optimize = commands.add_parser(
        "optimize", help="Bayesian optimization of channel settings (GP sampler, ask/tell)"
    )
    optimize_commands = optimize.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    optimize_suggest = optimize_commands.add_parser(
        "suggest", help="start a trial: the channel settings to put live next"
    )
    optimize_suggest.add_argument("--study", required=True, help="letters, digits, - and _")
    optimize_suggest.add_argument(
        "--space", default=None, help="search space YAML for a new study (default: packaged)"
    )
    optimize_suggest.set_defaults(handler=cmd_optimize_suggest)
    optimize_tell = optimize_commands.add_parser("tell", help="report a running trial's outcome")
    optimize_tell.add_argument("--study", required=True)
    optimize_tell.add_argument("--trial", type=int, required=True)
    optimize_tell.add_argument("--value", type=float, required=True, help="e.g. the day's RPM")
    optimize_tell.set_defaults(handler=cmd_optimize_tell)
    optimize_best = optimize_commands.add_parser("best", help="the best finished trial")
    optimize_best.add_argument("--study", required=True)
    optimize_best.set_defaults(handler=cmd_optimize_best)

    llm = commands.add_parser("llm", help="the script model (LoRA fine-tuned causal LM)")
    llm_commands = llm.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    llm_finetune = llm_commands.add_parser(
        "finetune", help="LoRA fine-tune with DeepSpeed, merge, register and gate `script`"
    )
    llm_finetune.add_argument(
        "--config", required=True, help="YAML of FinetuneConfig fields (training/llm/configs/)"
    )
    llm_finetune.add_argument("--max-steps", type=_positive, default=None)
    llm_finetune.set_defaults(handler=cmd_llm_finetune)
    llm_trainjob = llm_commands.add_parser(
        "trainjob", help="render the Kubeflow Trainer TrainJob of a `launcher: trainjob` recipe"
    )
    llm_trainjob.add_argument("config", help="recipe path inside the image (training/llm/configs/)")
    llm_trainjob.add_argument("--name", required=True, help="the TrainJob's name (a DNS label)")
    llm_trainjob.add_argument("--namespace", default=None)
    llm_trainjob.add_argument(
        "--suspend", action="store_true", help="created suspended: starts when unsuspended"
    )
    llm_trainjob.add_argument("--output", default=None, help="YAML file (default: stdout)")
    llm_trainjob.set_defaults(handler=cmd_llm_trainjob)

    experiments = commands.add_parser(
        "experiments", help="RevenueOptimizer's bandit experiments (A/B/n tests)"
    )
    experiments_commands = experiments.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    experiments_list = experiments_commands.add_parser("list", help="every experiment")
    experiments_list.add_argument("--json", action="store_true")
    experiments_list.set_defaults(handler=cmd_experiments_list)
    experiments_report = experiments_commands.add_parser(
        "report", help="per arm: mean, 95%% interval, P(best), expected loss; stop or continue"
    )
    experiments_report.add_argument("experiment")
    experiments_report.add_argument("--json", action="store_true")
    experiments_report.add_argument(
        "--html", default=None, help="also write the page with the posteriors over time"
    )
    experiments_report.set_defaults(handler=cmd_experiments_report)

    deploy = commands.add_parser(
        "deploy", help="render the KServe InferenceService of a model from its aliases"
    )
    deploy.add_argument("model", help="served model: trend, quality, niche, script")
    deploy.add_argument(
        "--canary", type=_percent, default=0, help="challenger's share of traffic (%%)"
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
        "--model", type=_name, required=True, help="registered model, e.g. quality"
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
    monitor_triggers.add_argument("--model", type=_name, default=None)
    monitor_triggers.set_defaults(handler=cmd_monitor_triggers)

    history = commands.add_parser("history", help="every alias change of a model")
    history.add_argument("model", type=_name)
    history.add_argument("--json", action="store_true")
    history.set_defaults(handler=cmd_history)
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


if __name__ == "__main__":
    sys.exit(main())
