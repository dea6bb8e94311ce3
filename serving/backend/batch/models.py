"""The batch API's bodies and answers: a submitted job and the validation of its items, the
accepted job, a job's report, its results and its dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import pydantic

from contentml.errors import UserError
from serving.backend.batch.schema import MAX_ID_CHARS
from serving.backend.costs import BookedName
from serving.backend.tasks import TASKS, Task

MAX_ITEMS = 10_000
"""Items per job; a larger batch is split by the caller."""


class Priority(StrEnum):
    BULK = "bulk"
    URGENT = "urgent"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class BatchRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = pydantic.Field(
        min_length=1,
        max_length=MAX_ITEMS,
        description="Each item: a unique `id` and the body of the task's route.",
    )
    priority: Priority = Priority.BULK
    channel: BookedName | None = pydantic.Field(
        None, max_length=MAX_ID_CHARS, description="Channel the cost is booked to."
    )


class JobAccepted(pydantic.BaseModel):
    job_id: str
    status: JobStatus
    total: int


class JobReport(pydantic.BaseModel):
    job_id: str
    task: Task
    priority: Priority
    channel: str
    created_at: float
    status: JobStatus
    total: int
    succeeded: int
    failed: int
    errors: list[str] = pydantic.Field(description="Distinct reasons items were dead-lettered.")


class ItemResult(pydantic.BaseModel):
    id: str
    result: dict[str, Any]


class DeadLetter(pydantic.BaseModel):
    job_id: str
    id: str
    error: str


def parse_items(task: Task, raw: Sequence[Any]) -> list[tuple[str, pydantic.BaseModel]]:
    """(id, validated body) per item; the first bad one raises `UserError` naming it."""
    body_type = TASKS[task].body
    parsed: list[tuple[str, pydantic.BaseModel]] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise UserError(f"items[{index}] must be an object with an id, not {item!r:.80}")
        item_id = item.get("id")
        if not isinstance(item_id, str) or not 1 <= len(item_id) <= MAX_ID_CHARS:
            raise UserError(f"items[{index}].id must be a string of 1-{MAX_ID_CHARS} characters")
        if item_id in seen:
            raise UserError(f"items[{index}].id {item_id!r} is repeated: ids must be unique")
        seen.add(item_id)
        try:
            body = body_type.model_validate({k: v for k, v in item.items() if k != "id"})
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'item'}: {err['msg']}" for err in e.errors()
            )
            raise UserError(f"items[{index}] (id {item_id!r}): {problems}") from e
        parsed.append((item_id, body))
    return parsed
