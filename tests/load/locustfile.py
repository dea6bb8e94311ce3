"""The load tests' locust user: trend forecasts over V1 and the task route (`traffic.py`).

`python -m tests.load` drives it as a library; on its own, against a running server:

    .venv/bin/locust -f tests/load/locustfile.py --headless -u 10 -r 10 -t 60s \
        --host http://127.0.0.1:8085 --series-ids H1,H2,H3

Each request's outcome (`traffic.Outcome`), answering version and fallback flag go into the
request event's `context`; 429 and 503 count as rejections, not failures, in locust's
statistics.
"""

from __future__ import annotations

import itertools

from locust import FastHttpUser, events, task
from locust.env import Environment

from tests.load.traffic import (
    MIX,
    Call,
    Kind,
    Outcome,
    Traffic,
    judge,
    poisson_starts,
    shared_histories,
)

RATE_PER_USER = 4.0
"""Requests per second each user sends unless the runner sets another pace."""

SHARED = shared_histories()
_seeds = itertools.count(1)


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument(
        "--series-ids",
        default="H1",
        help="comma-separated series ids the trend champion has forecasts for",
    )
    parser.add_argument("--token", default="", help="bearer token, where the server wants one")


def _option(environment: Environment, name: str) -> str:
    return getattr(environment.parsed_options, name, "") or ""


class TrendUser(FastHttpUser):
    wait_time = poisson_starts(RATE_PER_USER)
    network_timeout = 30.0
    connection_timeout = 5.0

    def on_start(self) -> None:
        series_ids = [s for s in _option(self.environment, "series_ids").split(",") if s]
        self.traffic = Traffic(series_ids or ["H1"], next(_seeds), SHARED)
        token = _option(self.environment, "token")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    @task(MIX[Kind.V1_SERIES])
    def v1_series(self) -> None:
        self.send(self.traffic.next(Kind.V1_SERIES))

    @task(MIX[Kind.V1_HISTORY])
    def v1_history(self) -> None:
        self.send(self.traffic.next(Kind.V1_HISTORY))

    @task(MIX[Kind.TASK_ROUTE])
    def task_route(self) -> None:
        self.send(self.traffic.next(Kind.TASK_ROUTE))

    def send(self, call: Call) -> None:
        with self.client.post(
            call.path,
            json=call.body,
            name=call.kind.value,
            headers=self.headers,
            catch_response=True,
        ) as response:
            answer = judge(call.kind, response.status_code, response.content)
            response.request_meta["context"].update(
                outcome=answer.outcome, version=answer.version, fallback=answer.fallback
            )
            if answer.outcome is Outcome.FAILED:
                response.failure(answer.problem)
            else:
                response.success()
