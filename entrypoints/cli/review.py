"""`contentml review`: the human review queue (texts the quality gate sent to `review`): list
them, show one, approve or reject it. A decision becomes a labelled row of the next quality
training (`training/quality/review_store.py`)."""

from __future__ import annotations

import argparse
import datetime
import textwrap

from contentml.settings import Settings
from entrypoints.cli.base import positive_int, print_json

STATUSES = ("open", "pending", "expired", "approved", "rejected")


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def _store(settings: Settings):
    from training.quality.review_store import ReviewStore

    return ReviewStore.from_settings(settings)


def cmd_review_list(settings: Settings, args: argparse.Namespace) -> int:
    from training.quality.review_store import Status

    store = _store(settings)
    try:
        status = None if args.status == "open" else Status(args.status)
        items = store.list_items(status, args.channel, args.limit)
    finally:
        store.close()
    if args.json:
        print_json({"items": [item.to_dict() for item in items]})
        return 0
    for item in items:
        text = item.text.replace("\n", " ")
        print(
            f"{item.item_id}  {item.status.value:<8}  {_when(item.created_at)}  "
            f"video {item.video_id or '-'}  v{item.model_version or '-'}  "
            f"{text[:60]}{'...' if len(text) > 60 else ''}"
        )
    return 0


def cmd_review_show(settings: Settings, args: argparse.Namespace) -> int:
    store = _store(settings)
    try:
        item = store.get(args.item_id)
    finally:
        store.close()
    if args.json:
        print_json(item.to_dict())
        return 0
    print(f"item      {item.item_id} ({item.status.value}, from {item.source}, seen {item.seen}x)")
    print(f"created   {_when(item.created_at)}   expired {_when(item.expired_at)}")
    print(f"channel   {item.channel or '-'}   video {item.video_id or '-'}")
    score = "-" if item.score is None else f"{item.score:.3f}"
    print(f"model     v{item.model_version or '-'}   score {score}")
    labels = ", ".join(f"{c} {p:.2f}" for c, p in item.labels.items()) or "not scored"
    print(f"labels    {labels}")
    for reason in item.reasons:
        print(f"reason    {reason.get('check')}: {reason.get('detail')}")
    if item.decided_at is not None:
        print(f"decided   {_when(item.decided_at)}: label {item.label}; {item.note or ''}")
    print(textwrap.indent(item.text, "  | "))
    return 0


def cmd_review_decide(settings: Settings, args: argparse.Namespace) -> int:
    store = _store(settings)
    try:
        item = store.decide(args.item_id, args.decision, args.label, args.note)
    finally:
        store.close()
    if args.json:
        print_json(item.to_dict())
    else:
        print(f"{item.item_id} {item.status.value}: a training row labelled {item.label}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """`review list/show/approve/reject`."""
    review = commands.add_parser("review", help="the human review queue of the quality gate")
    verbs = review.add_subparsers(dest="review_command", required=True)
    listing = verbs.add_parser("list", help="review items, oldest first")
    listing.add_argument(
        "--status",
        choices=STATUSES,
        default="open",
        help="open (pending and expired, the default), or one status",
    )
    listing.add_argument("--channel", default=None)
    listing.add_argument("--limit", type=positive_int, default=100)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_review_list)
    show = verbs.add_parser("show", help="one item: text, reasons, labels, model version")
    show.add_argument("item_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_review_show)
    approve = verbs.add_parser("approve", help="the text is fine: a training row labelled neither")
    reject = verbs.add_parser(
        "reject", help="the text is not fine: a row labelled --label, else the flagged class"
    )
    reject.add_argument(
        "--label",
        choices=("hate_speech", "offensive_language"),
        default=None,
        help="default: the classifier's most likely flagged class",
    )
    for decision, verb in (("approve", approve), ("reject", reject)):
        verb.add_argument("item_id")
        verb.add_argument("--note", default=None, help="why, kept with the decision")
        verb.add_argument("--json", action="store_true")
        verb.set_defaults(handler=cmd_review_decide, decision=decision)
    approve.set_defaults(label=None)
