"""`contentml batch`: batch jobs: submit, follow, work, dead letters."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from contentml.errors import UserError
from contentml.protocol import Task
from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    positive_int,
    print_json,
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

    from serving.backend.batch.models import BatchRequest
    from serving.backend.batch.queue import BatchQueue

    try:
        request = BatchRequest(
            items=_batch_items(args.file), priority=args.priority, channel=args.channel
        )
    except pydantic.ValidationError as e:
        raise UserError(f"{args.file}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from e
    queue = BatchQueue(settings)
    try:
        print_json(queue.submit(Task(args.task), request).model_dump(mode="json"))
    finally:
        queue.close()
    return 0


def _read_jobs(settings: Settings, read):
    """`read(store)` on the batch job store, closed after."""
    from serving.backend.batch.store import JobStore

    store = JobStore(settings.backend_store)
    try:
        return read(store)
    finally:
        store.close()


def cmd_batch_status(settings: Settings, args: argparse.Namespace) -> int:
    report = _read_jobs(settings, lambda store: store.report(args.job_id))
    print_json(report.model_dump(mode="json"))
    return 0


def cmd_batch_results(settings: Settings, args: argparse.Namespace) -> int:
    results = _read_jobs(settings, lambda store: store.results(args.job_id))
    print_json([r.model_dump(mode="json") for r in results])
    return 0


def cmd_batch_worker(settings: Settings, args: argparse.Namespace) -> int:
    from serving.server import work

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work(settings, args.threads)
    return 0


def cmd_batch_dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    letters = _read_jobs(settings, lambda store: store.dead_letters(args.job))
    if args.json:
        print_json([letter.model_dump(mode="json") for letter in letters])
    else:
        for letter in letters:
            print(f"{letter.job_id}  {letter.id}  {letter.error}")
    return 0


def cmd_batch_dlq_retry(settings: Settings, args: argparse.Namespace) -> int:
    from serving.backend.batch.queue import BatchQueue

    if args.id and not args.job:
        raise UserError("--id needs --job: item ids are unique within a job")
    queue = BatchQueue(settings)
    try:
        count = queue.retry_dead_letters(args.job, args.id)
    finally:
        queue.close()
    print_json({"requeued": count})
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `batch` command."""
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
    batch_worker.add_argument("--threads", type=positive_int, default=1)
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
