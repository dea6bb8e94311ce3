"""Request parsing every predictor shares: V1 bodies and pydantic-validated instances, with
payload problems raised as KServe's `InvalidInput` (HTTP 400) naming the instance and field."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import pydantic
from kserve.errors import InvalidInput

Request = TypeVar("Request", bound=pydantic.BaseModel)


def instances_from_v1(payload: Any) -> list[Any]:
    """The `instances` list of a V1 `:predict` body."""
    if isinstance(payload, bytes):
        # KServe hands over the raw body when the client sent no JSON content type.
        try:
            payload = json.loads(payload)
        except ValueError as e:
            raise InvalidInput(f"request body is not valid JSON: {e}") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise InvalidInput('expected a JSON object {"instances": [...]}')
    return payload["instances"]


def parse_instances(
    instances: list[Any], request_type: type[Request], max_instances: int
) -> list[Request]:
    """Validate every instance; the first bad one fails the call with its index and fields."""
    if not instances:
        raise InvalidInput("'instances' must hold at least one instance")
    if len(instances) > max_instances:
        raise InvalidInput(f"at most {max_instances} instances per call, got {len(instances)}")
    requests = []
    for index, instance in enumerate(instances):
        try:
            requests.append(request_type.model_validate(instance))
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'instance'}: {err['msg']}"
                for err in e.errors()
            )
            raise InvalidInput(f"instance {index}: {problems}") from e
    return requests
