"""The platform's HTTP vocabulary, which the servers (`serving/`) and their callers
(`serving.caller`: the client, the script strategist) both import: the tasks, their routes
and SLAs, and the headers a caller sends."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Task(StrEnum):
    """A call of the content pipeline, answered within its SLA."""

    TREND = "trend"
    QUALITY = "quality"
    SCRIPT = "script"


@dataclass(frozen=True)
class TaskRoute:
    route: str
    """The backend's plain-JSON route of the task."""

    sla_seconds: float
    """How long the caller waits for the answer, retries included."""

    model: str
    """The served model that answers it."""


TASK_ROUTES: dict[Task, TaskRoute] = {
    Task.TREND: TaskRoute("/predict/trend", 5.0, "trend"),
    Task.QUALITY: TaskRoute("/score/quality", 2.0, "quality"),
    Task.SCRIPT: TaskRoute("/generate/script", 30.0, "script"),
}
"""The backend team's contract: one route and SLA per task."""

OPENAI_ROUTE_PREFIX = "/openai"
"""Where the model server's OpenAI-compatible routes live (`/openai/v1/chat/completions`),
as in KServe's own OpenAI server."""

TIMEOUT_HEADER = "X-Contentml-Timeout-Seconds"
"""How long the caller waits for a generation: the server ends it in time to answer with the
text so far."""
