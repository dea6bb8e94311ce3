"""huey's queue messages as JSON, never pickles: writing to the batch queue does not run code
in the workers."""

from __future__ import annotations

import datetime
import json
from typing import Any

from huey.registry import Message
from huey.serializer import Serializer

_DATETIME = "__datetime__"
_TIMEDELTA = "__timedelta__"
_MESSAGE = "__huey_message__"


def _to_json(value: Any) -> Any:
    """`value` as JSON can carry it: huey's `Message` tuples (nested for pipelines),
    datetimes (a retry's `eta`) and timedeltas (`expires`) tagged, tuples as lists."""
    if isinstance(value, Message):
        return {_MESSAGE: {k: _to_json(v) for k, v in value._asdict().items()}}
    if isinstance(value, datetime.datetime):
        return {_DATETIME: value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {_TIMEDELTA: value.total_seconds()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"a batch queue message cannot carry a {type(value).__name__}: {value!r:.80}")


def _from_json(found: dict[str, Any]) -> Any:
    if _MESSAGE in found:
        return Message(**found[_MESSAGE])
    if _DATETIME in found:
        return datetime.datetime.fromisoformat(found[_DATETIME])
    if _TIMEDELTA in found:
        return datetime.timedelta(seconds=found[_TIMEDELTA])
    return found


class JsonSerializer(Serializer):
    """huey's messages as JSON instead of pickle: a worker unpickling what it dequeues would
    run any code that whoever can write to the queue (Redis, the SQLite file) put there. A
    message that is not this JSON fails to decode: huey's consumer logs it and drops it, and the
    reaper queues its chunk again (`LOST_MESSAGE_SECONDS`)."""

    def _serialize(self, data: Any) -> bytes:
        return json.dumps(_to_json(data), separators=(",", ":")).encode()

    def _deserialize(self, data: bytes) -> Any:
        return json.loads(data, object_hook=_from_json)
