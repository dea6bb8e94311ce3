"""`GET /v1/capacity`: the generation rate the content pipeline should keep to, from the script
providers' state in the shared store (`serving.caller.provider_monitor`):

    {"rate": 1.0, "reason": "every provider is within its quota and error threshold",
     "providers_skipped": []}

`rate` is 1.0 normally and 0.5 under contingency (a provider past 95 % of today's quota or its
failure threshold, skipped by the chain, whose later providers and finally our self-hosted
model write the scripts); `reason` says which and why. The token rules of the other routes
apply (`serving.admission`). A change of the rate also goes to the event stream
(`capacity.changed`), once, from whichever replica sees it first.
"""

from __future__ import annotations

import pydantic
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from serving.caller.provider_monitor import ProviderMonitor

CAPACITY_ROUTE = "/v1/capacity"


class CapacityAnswer(pydantic.BaseModel):
    rate: float = pydantic.Field(description="Recommended share of the normal generation rate.")
    reason: str = pydantic.Field(description="Why this rate: the providers skipped, or none.")
    providers_skipped: list[str] = pydantic.Field(
        description="Providers the chain skips now for their quota or errors."
    )


def capacity_router(monitor: ProviderMonitor) -> APIRouter:
    """The route, answering from `monitor` (the store work runs off the event loop)."""
    router = APIRouter()

    @router.get(CAPACITY_ROUTE, response_model=CapacityAnswer)
    async def capacity() -> dict:
        answer = await run_in_threadpool(monitor.current_capacity)
        return answer.to_json()

    return router
