"""The batch API's routes: submitting a job, a job's report and results, and the admin listing
of every caller's jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from contentml.errors import UserError
from serving.backend.batch.models import BatchRequest, ItemResult, JobAccepted, JobReport
from serving.backend.batch.queue import FULL_RETRY_AFTER_SECONDS, BatchQueue, OverCapacity
from serving.backend.batch.schema import MAX_ID_CHARS
from serving.backend.costs import BookedName
from serving.backend.tasks import MAX_BODY_BYTES, Task

MAX_BATCH_BODY_BYTES = 64 * MAX_BODY_BYTES
"""1,000 trend items with a month of history each are about 10 MB."""

MAX_LISTED_JOBS = 500
"""Jobs one listing returns at most, each a report of a few queries."""


def batch_router(queue: BatchQueue) -> APIRouter:
    """`POST /batch/{task}`, `GET /batch/jobs/{id}` and `GET /batch/jobs/{id}/results`, and
    the listing of every caller's jobs, `GET /batch/jobs` (an admin route)."""
    router = APIRouter(prefix="/batch", tags=["batch"])

    def listing(
        limit: Annotated[int, Query(ge=1, le=MAX_LISTED_JOBS)] = 50,
        channel: Annotated[BookedName | None, Query(max_length=MAX_ID_CHARS)] = None,
    ) -> list[JobReport]:
        return queue.store.recent(limit, channel)

    def submit(task: Task, request: BatchRequest) -> JobAccepted:
        try:
            return queue.submit(task, request)
        except OverCapacity as e:
            raise HTTPException(429, str(e), {"Retry-After": str(FULL_RETRY_AFTER_SECONDS)}) from e
        except UserError as e:
            raise HTTPException(422, str(e)) from e

    def status(job_id: str) -> JobReport:
        try:
            return queue.store.report(job_id)
        except UserError as e:
            raise HTTPException(404, str(e)) from e

    def job_results(job_id: str) -> list[ItemResult]:
        try:
            return queue.store.results(job_id)
        except UserError as e:
            raise HTTPException(404, str(e)) from e

    router.add_api_route(
        "/{task}",
        submit,
        methods=["POST"],
        status_code=202,
        max_body_size=MAX_BATCH_BODY_BYTES,
        summary="Submit a batch job (answered by the batch workers)",
    )
    router.add_api_route("/jobs", listing, methods=["GET"], summary="The newest jobs (admin)")
    router.add_api_route("/jobs/{job_id}", status, methods=["GET"])
    router.add_api_route("/jobs/{job_id}/results", job_results, methods=["GET"])
    return router
