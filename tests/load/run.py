"""`make loadtest` (`python -m tests.load`): locust against a real `contentml serve --models trend`
on a free port, in the state folder of `CONTENTML_HOME` (a trend champion made by the training
pipeline where there is none, and a copy of it to swap with: `state.py`).

Scenarios, in this order, each printing one summary line (the runner a JSON report at the end):

1. steady: `--users` users together at `--rate` requests per second, arriving as a Poisson
   stream (`traffic.poisson_starts`, `traffic.MIX`); requests, failures, p50/p95/p99.
2. cycles: the same load while `contentml promote` and `contentml rollback` swap the champion
   five times, until at least 10,000 requests; target: 0 requests not answered 2xx, p99 within
   1.5x the steady p99 of this run (right after it, so both see the same machine).
3. saturation: the capacity (answered per second by closed-loop users without pause), then twice
   that offered; targets: accepted p99 within the trend SLA (5 s), rejections (429/503, the
   server's backpressure) answered in < 50 ms. Rejections are not failures.
4. soak: the steady load for `--soak-minutes`; the server's RSS after a warm-up and at the end,
   target: growth within 10 %.

The exit status is 1 when a target is missed. The server's own log (a line per request) goes to
`<CONTENTML_HOME>/loadtest-server.log`, its prediction log to a temporary folder (load-test
traffic must not reach the monitoring jobs' data).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from locust import constant
from locust.env import Environment

from contentml.runtime import freeze_heap
from contentml.settings import Settings
from entrypoints.demo import free_port, model_server
from serving.backend.tasks import TASKS, Task
from tests.load.locustfile import TrendUser
from tests.load.traffic import HORIZON, Outcome, poisson_starts

MODEL = "trend"
V1_PATH = "/v1/models/trend:predict"
SLA_MS = TASKS[Task.TREND].sla_seconds * 1000
REJECTION_TARGET_MS = 50.0
CYCLE_P99_TARGET = 1.5
"""The cycles' p99 may be at most this many times the steady p99."""
SOAK_GROWTH_TARGET_PCT = 10.0

SERIES_CANDIDATES = [f"H{i}" for i in range(1, 49)]
"""Series ids probed for a cached forecast (the demo's champion is trained on M4's first 24)."""

SETTLE_SECONDS = 2.0
"""Discarded after the users are spawned: their first requests open connections."""

MAX_SPAWN_RATE = 100
"""Users started per second (locust warns above 100)."""

OVERLOAD_RATE_PER_USER = 1.0
"""Requests per second of each user at 2x saturation: many slow users, so a server that queues
instead of refusing sees the whole load in flight."""

CLI_NICENESS = 10
"""`contentml promote`/`rollback` run niced: in the cluster they run on another machine, here
they would take CPU from the server they measure."""

HOLD_SECONDS = 8.0
"""Load kept on each version at least this long after the alias moved to it (the server reads
the aliases every `CONTENTML_SERVING_POLL_SECONDS`, 2 s by default)."""

SOAK_WARMUP_SECONDS = 20.0
RSS_SAMPLE_SECONDS = 10.0


class Scenario(StrEnum):
    STEADY = "steady"
    CYCLES = "cycles"
    SATURATION = "saturation"
    SOAK = "soak"


@dataclass(frozen=True)
class LoadConfig:
    users: int = 10
    """Users of the steady, cycles and soak scenarios."""

    rate: float = 50.0
    """Requests per second those users send together."""

    warmup_seconds: float = 15.0
    """Load at the steady rate after the server starts, not measured (first calls, caches)."""

    steady_seconds: float = 60.0
    """Length of the steady measurement."""

    cycles: int = 5
    """Promote/rollback cycles under load."""

    cycle_requests: int = 10_000
    """Requests the cycles scenario sends at least (its length is this over `rate`)."""

    probe_users: int = 16
    """Closed-loop users, without pause, that find the capacity."""

    probe_seconds: float = 20.0
    """Length of the capacity measurement."""

    overload_seconds: float = 40.0
    """Length of the 2x-saturation measurement."""

    soak_minutes: float = 2.0
    """Length of the soak (after its warm-up)."""

    scenarios: tuple[Scenario, ...] = tuple(Scenario)
    """Which scenarios run (cycles compares with steady's p99, so it needs steady too)."""

    token: str = field(default="", repr=False)
    """Bearer token for the server (empty: the settings' `api_token`, where there is one)."""

    def __post_init__(self) -> None:
        for name in ("users", "cycles", "cycle_requests", "probe_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in (
            "rate",
            "steady_seconds",
            "probe_seconds",
            "overload_seconds",
            "soak_minutes",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.warmup_seconds < 0:
            raise ValueError(f"warmup_seconds must be >= 0, not {self.warmup_seconds}")
        if Scenario.CYCLES in self.scenarios and Scenario.STEADY not in self.scenarios:
            raise ValueError("the cycles scenario compares with steady's p99: run both")


@dataclass(frozen=True)
class Versions:
    champion: str
    other: str
    """A registered copy of the champion, swapped in and out by the cycles."""


def _say(message: str) -> None:
    print(f"[load] {message}", file=sys.stderr, flush=True)


# --- recording what the users saw ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    start: float
    """Wall-clock time the request was sent (seconds since the epoch, as locust records it)."""
    ms: float
    kind: str
    outcome: Outcome
    version: str | None
    fallback: bool

    @property
    def end(self) -> float:
        return self.start + self.ms / 1000


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy, all cores (Linux's guest time is already
    part of user time)."""
    times = psutil.cpu_times()
    busy = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(times, name, 0.0) for name in busy)


def cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds of a process and its children alive now."""
    total = 0.0
    for p in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def own_cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds of the process itself (the server is our child: counted on its own)."""
    times = process.cpu_times()
    return times.user + times.system


class Recorder:
    """Every request's outcome, from locust's request event (the user sets the outcome, answering
    version and fallback flag in the event's context), and the CPU the server, this load
    generator and the whole machine used meanwhile (in cores: 1.0 is one core busy)."""

    def __init__(self, server: psutil.Process) -> None:
        self.server = server
        self.me = psutil.Process()
        self.clear()

    def __call__(
        self,
        name: str,
        response_time: float,
        context: dict | None = None,
        exception: BaseException | None = None,
        start_time: float | None = None,
        **_: Any,
    ) -> None:
        context = context or {}
        outcome = context.get("outcome") or (Outcome.FAILED if exception else Outcome.OK)
        self.rows.append(
            Row(
                start_time or time.time(),
                response_time,
                name,
                Outcome(outcome),
                context.get("version"),
                bool(context.get("fallback")),
            )
        )

    def clear(self) -> None:
        self.rows: list[Row] = []
        self.since = time.time()
        self._cpu = (cpu_seconds(self.server), own_cpu_seconds(self.me), machine_cpu_seconds())

    def seconds(self) -> float:
        return time.time() - self.since

    def cpu(self) -> dict[str, float]:
        """Cores used since `clear()`; `other` is the machine's less the server's and ours
        (other processes, the promote/rollback commands)."""
        now = (cpu_seconds(self.server), own_cpu_seconds(self.me), machine_cpu_seconds())
        elapsed = self.seconds()
        server, ours, machine = ((b - a) / elapsed for a, b in zip(self._cpu, now, strict=True))
        return {
            "cpu_server_cores": round(server, 2),
            "cpu_loadgen_cores": round(ours, 2),
            "cpu_other_cores": round(max(0.0, machine - server - ours), 2),
        }

    def snapshot(self) -> tuple[list[Row], float, dict[str, float]]:
        """The rows so far, the seconds they span and the CPU used."""
        return list(self.rows), self.seconds(), self.cpu()


def latency(ms: Sequence[float], prefix: str = "") -> dict[str, float | None]:
    """p50/p95/p99/max in milliseconds (None without requests)."""
    names = [f"{prefix}{p}_ms" for p in ("p50", "p95", "p99", "max")]
    if not ms:
        return dict.fromkeys(names)
    values = np.percentile(np.asarray(ms), [50, 95, 99, 100])
    return {name: round(float(v), 1) for name, v in zip(names, values, strict=True)}


def counts(rows: Sequence[Row], seconds: float) -> dict[str, Any]:
    """Requests by outcome, the answered rate and the answering versions."""
    by_outcome = {o: sum(r.outcome is o for r in rows) for o in Outcome}
    versions: dict[str, int] = {}
    for row in rows:
        if row.version is not None:
            versions[row.version] = versions.get(row.version, 0) + 1
    return {
        "requests": len(rows),
        "ok": by_outcome[Outcome.OK],
        "rejected": by_outcome[Outcome.REJECTED],
        "failed": by_outcome[Outcome.FAILED],
        "fallbacks": sum(r.fallback for r in rows),
        "seconds": round(seconds, 1),
        "sent_per_s": round(len(rows) / seconds, 1),
        "ok_per_s": round(by_outcome[Outcome.OK] / seconds, 1),
        "versions": dict(sorted(versions.items())),
        "by_kind": by_kind(rows),
    }


def by_kind(rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """Per kind of request: counts, answered p50/p99 and rejected p99 (KServe's V1 route and
    the task route reach the model by different paths, and saturate differently)."""
    kinds: dict[str, list[Row]] = {}
    for row in rows:
        kinds.setdefault(row.kind, []).append(row)
    figures = {}
    for kind, of_kind in sorted(kinds.items()):
        ok = latency([r.ms for r in of_kind if r.outcome is Outcome.OK])
        rejected = [r.ms for r in of_kind if r.outcome is Outcome.REJECTED]
        figures[kind] = {
            "requests": len(of_kind),
            "rejected": len(rejected),
            "failed": sum(r.outcome is Outcome.FAILED for r in of_kind),
            "ok_p50_ms": ok["p50_ms"],
            "ok_p99_ms": ok["p99_ms"],
            "rejected_p99_ms": latency(rejected)["p99_ms"],
        }
    return figures


def paced(rate_per_user: float | None) -> type[TrendUser]:
    """The trend user at `rate_per_user` requests per second, Poisson arrivals (None: back to
    back)."""
    pace = poisson_starts(rate_per_user) if rate_per_user else constant(0)
    return type("PacedTrendUser", (TrendUser,), {"wait_time": pace})


@contextlib.contextmanager
def load(run: Run, users: int, rate_per_user: float | None) -> Iterator[Recorder]:
    """`users` locust users on the server while the block runs, recorded from once they are
    all started and settled."""
    environment = Environment(
        user_classes=[paced(rate_per_user)], host=run.url, parsed_options=run.options
    )
    recorder = Recorder(run.server)
    environment.events.request.add_listener(recorder)
    runner = environment.create_local_runner()
    spawn_rate = min(users, MAX_SPAWN_RATE)
    runner.start(users, spawn_rate=spawn_rate)
    try:
        time.sleep(users / spawn_rate + SETTLE_SECONDS)
        # As the server does: the load generator's own full collections held the GIL, and
        # every request in flight meanwhile was timed that much slower than it was answered.
        freeze_heap()
        recorder.clear()
        yield recorder
    finally:
        runner.quit()


# --- the server ------------------------------------------------------------------------------


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Processes started in the block write their standard output and error to `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def server_process(port: int) -> psutil.Process:
    """Our `contentml serve --port PORT` child."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            command = child.cmdline()
            if "serve" in command and str(port) in command:
                return child
    raise RuntimeError(f"no `contentml serve --port {port}` among this process's children")


def rss_mib(process: psutil.Process) -> float:
    """Resident memory of the server and any processes it started."""
    tree = [process, *process.children(recursive=True)]
    return sum(p.memory_info().rss for p in tree) / 2**20


def cached_series(url: str, headers: dict[str, str]) -> list[str]:
    """The candidate series ids the champion answers from its precomputed forecasts."""
    found = []
    with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
        for series_id in SERIES_CANDIDATES:
            instance = {"series_id": series_id, "horizon": HORIZON}
            response = http.post(V1_PATH, json={"instances": [instance]})
            if response.status_code == 200:
                if response.json()["predictions"][0].get("source") == "cache":
                    found.append(series_id)
    if not found:
        raise RuntimeError(f"the trend champion has no cached forecast for {SERIES_CANDIDATES}")
    return found


def prepare(settings: Settings) -> Versions:
    """The champion and its swap partner (`state.py`, in a process of its own)."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.load.state"],
        env={**os.environ, **settings.to_env()},
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    state = json.loads(result.stdout.strip().splitlines()[-1])
    return Versions(state["champion"], state["other"])


def registry_command(settings: Settings, *args: str) -> float:
    """`contentml ARGS`, niced; the seconds it took."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", *args],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.nice(CLI_NICENESS),
    )
    if result.returncode != 0:
        raise RuntimeError(f"`contentml {' '.join(args)}` failed: {result.stderr.strip()[-800:]}")
    return time.monotonic() - started


# --- scenarios -------------------------------------------------------------------------------


@dataclass
class Run:
    """What every scenario needs, and the figures so far."""

    url: str
    server: psutil.Process
    settings: Settings
    versions: Versions
    config: LoadConfig
    options: argparse.Namespace
    results: dict[str, dict] = field(default_factory=dict)

    def steady_load(self) -> contextlib.AbstractContextManager[Recorder]:
        return load(self, self.config.users, self.config.rate / self.config.users)


def steady(run: Run) -> dict:
    with run.steady_load() as recorder:
        time.sleep(run.config.steady_seconds)
        rows, seconds, cpu = recorder.snapshot()
    figures = {**counts(rows, seconds), **latency([r.ms for r in rows]), **cpu}
    figures["met"] = figures["failed"] + figures["rejected"] == 0
    _say(
        f"steady: {figures['requests']:,} requests at {figures['sent_per_s']}/s "
        f"({run.config.users} users), {figures['failed'] + figures['rejected']} not 2xx, "
        f"p50 {figures['p50_ms']} ms, p95 {figures['p95_ms']} ms, p99 {figures['p99_ms']} ms, "
        f"{'met' if figures['met'] else 'MISSED'} (target: all 2xx)"
    )
    return figures


@dataclass(frozen=True)
class Change:
    moved_at: float
    """Wall-clock time the command that moved the alias returned."""
    version: str
    command_seconds: float


def switch_seconds(rows: Sequence[Row], changes: Sequence[Change]) -> list[float | None]:
    """For each alias change: seconds until a request sent after it was answered by the version
    it names (None: not before the next change)."""
    found: list[float | None] = []
    for change, after in zip(changes, [*changes[1:], None], strict=True):
        until = after.moved_at if after else math.inf
        ends = [
            r.end
            for r in rows
            if change.moved_at <= r.start < until and r.version == change.version
        ]
        found.append(round(min(ends) - change.moved_at, 2) if ends else None)
    return found


def cycles(run: Run) -> dict:
    config, versions = run.config, run.versions
    planned = config.cycle_requests / config.rate
    step = planned / (2 * config.cycles)
    changes: list[Change] = []
    error = None
    with run.steady_load() as recorder:
        started = time.monotonic()
        try:
            for i in range(2 * config.cycles):
                reason = f"load test, cycle {i // 2 + 1}"
                if i % 2 == 0:
                    args = ("promote", MODEL, versions.other, "--reason", reason)
                    version = versions.other
                else:
                    args, version = ("rollback", MODEL, "--reason", reason), versions.champion
                seconds = registry_command(run.settings, *args)
                changes.append(Change(time.time(), version, round(seconds, 2)))
                hold = max(started + (i + 1) * step, time.monotonic() + HOLD_SECONDS)
                time.sleep(hold - time.monotonic())
        except RuntimeError as e:
            error = str(e)
        deadline = time.monotonic() + planned
        while len(recorder.rows) < config.cycle_requests and time.monotonic() < deadline:
            time.sleep(0.5)
        rows, seconds, cpu = recorder.snapshot()
    figures = {**counts(rows, seconds), **latency([r.ms for r in rows]), **cpu}
    steady_p99 = run.results[Scenario.STEADY]["p99_ms"]
    switches = switch_seconds(rows, changes)
    figures |= {
        "cycles_done": len(changes) // 2,
        "not_2xx": figures["failed"] + figures["rejected"],
        "steady_p99_ms": steady_p99,
        "p99_over_steady": round(figures["p99_ms"] / steady_p99, 2) if steady_p99 else None,
        "switch_seconds": switches,
        "command_seconds": [c.command_seconds for c in changes],
        "error": error,
    }
    figures["met"] = (
        error is None
        and figures["cycles_done"] == config.cycles
        and figures["requests"] >= config.cycle_requests
        and figures["not_2xx"] == 0
        and None not in switches
        and figures["p99_over_steady"] is not None
        and figures["p99_over_steady"] <= CYCLE_P99_TARGET
    )
    observed = [s for s in switches if s is not None]
    _say(
        f"cycles: {figures['requests']:,} requests across {figures['cycles_done']} "
        f"promote/rollback cycles, {figures['not_2xx']} not 2xx (target 0), p99 "
        f"{figures['p99_ms']} ms vs steady {steady_p99} ms = {figures['p99_over_steady']}x "
        f"(target <= {CYCLE_P99_TARGET}x), new version answering "
        f"{max(observed, default=float('nan')):.2f} s after a move at most, "
        f"{'met' if figures['met'] else 'MISSED'}" + (f"; {error}" if error else "")
    )
    return figures


def saturation(run: Run) -> dict:
    config = run.config
    with load(run, config.probe_users, None) as recorder:
        time.sleep(config.probe_seconds)
        probe, probe_seconds, probe_cpu = recorder.snapshot()
    capacity = sum(r.outcome is Outcome.OK for r in probe) / probe_seconds
    offered = 2 * capacity
    users = max(config.probe_users, math.ceil(offered / OVERLOAD_RATE_PER_USER))
    with load(run, users, offered / users) as recorder:
        time.sleep(config.overload_seconds)
        rows, seconds, cpu = recorder.snapshot()
    accepted = [r.ms for r in rows if r.outcome is Outcome.OK]
    rejected = [r.ms for r in rows if r.outcome is Outcome.REJECTED]
    figures = {
        "capacity_per_s": round(capacity, 1),
        **latency([r.ms for r in probe if r.outcome is Outcome.OK], "capacity_"),
        **{f"capacity_{k}": v for k, v in probe_cpu.items()},
        "offered_per_s": round(offered, 1),
        "users": users,
        **counts(rows, seconds),
        **latency(accepted, "accepted_"),
        **latency(rejected, "rejected_"),
        "sla_ms": SLA_MS,
        "rejection_target_ms": REJECTION_TARGET_MS,
        **cpu,
    }
    figures["met"] = (
        figures["failed"] == 0
        and bool(accepted)
        and figures["accepted_p99_ms"] <= SLA_MS
        and (not rejected or figures["rejected_p99_ms"] < REJECTION_TARGET_MS)
    )
    rejections = (
        f"rejected {len(rejected):,} (429/503) p99 {figures['rejected_p99_ms']} ms "
        f"(target < {REJECTION_TARGET_MS:g} ms)"
        if rejected
        else "no rejections (the server queued everything)"
    )
    _say(
        f"saturation: capacity {figures['capacity_per_s']}/s; offered 2x = {offered:.1f}/s "
        f"({users} users), sent {figures['sent_per_s']}/s: accepted {len(accepted):,} p99 "
        f"{figures['accepted_p99_ms']} ms (SLA {SLA_MS:g} ms, {figures['fallbacks']} fallbacks), "
        f"{rejections}, {figures['failed']} failed, {'met' if figures['met'] else 'MISSED'}"
    )
    return figures


def soak(run: Run) -> dict:
    process = run.server
    samples: list[tuple[float, float]] = []
    with run.steady_load() as recorder:
        time.sleep(SOAK_WARMUP_SECONDS)
        recorder.clear()
        started = time.monotonic()
        end = started + run.config.soak_minutes * 60
        samples.append((0.0, rss_mib(process)))
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(RSS_SAMPLE_SECONDS, left))
            samples.append((round(time.monotonic() - started, 1), rss_mib(process)))
        rows, seconds, cpu = recorder.snapshot()
    start_mib, end_mib = samples[0][1], samples[-1][1]
    growth = 100 * (end_mib - start_mib) / start_mib
    figures = {
        **counts(rows, seconds),
        **latency([r.ms for r in rows]),
        **cpu,
        "minutes": run.config.soak_minutes,
        "rss_start_mib": round(start_mib, 1),
        "rss_end_mib": round(end_mib, 1),
        "rss_peak_mib": round(max(m for _, m in samples), 1),
        "rss_growth_pct": round(growth, 2),
        "rss_samples_mib": [(t, round(m, 1)) for t, m in samples],
    }
    figures["met"] = growth <= SOAK_GROWTH_TARGET_PCT and figures["failed"] == 0
    _say(
        f"soak: {run.config.soak_minutes:g} min, {figures['requests']:,} requests, "
        f"{figures['failed']} failed, p99 {figures['p99_ms']} ms; server RSS "
        f"{figures['rss_start_mib']} -> {figures['rss_end_mib']} MiB ({growth:+.2f} %, peak "
        f"{figures['rss_peak_mib']}; target within {SOAK_GROWTH_TARGET_PCT:g} %), "
        f"{'met' if figures['met'] else 'MISSED'}"
    )
    return figures


SCENARIOS: dict[Scenario, Callable[[Run], dict]] = {
    Scenario.STEADY: steady,
    Scenario.CYCLES: cycles,
    Scenario.SATURATION: saturation,
    Scenario.SOAK: soak,
}


def run_scenarios(settings: Settings, config: LoadConfig) -> dict:
    versions = prepare(settings)
    _say(f"trend champion v{versions.champion}, swapped with v{versions.other} in the cycles")
    log = settings.home / "loadtest-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    # The server we start takes the token of these settings (CONTENTML_API_TOKEN) where set.
    token = config.token or getattr(settings, "api_token", "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="contentml-load-")))
        served = dataclasses.replace(settings, prediction_log=str(scratch / "predictions"))
        port = free_port()
        _say(f"starting `contentml serve --models {MODEL}` on port {port} (its log: {log})")
        try:
            with output_to(log):
                url = stack.enter_context(model_server(served, port, "--models", MODEL))
        except (RuntimeError, TimeoutError):
            sys.stderr.write(log.read_text(errors="replace")[-3000:])
            raise
        series_ids = cached_series(url, headers)
        options = argparse.Namespace(series_ids=",".join(series_ids), token=token, headless=True)
        run = Run(url, server_process(port), settings, versions, config, options)
        _say(f"{len(series_ids)} cached series; warming up for {config.warmup_seconds:g} s")
        with run.steady_load():
            time.sleep(config.warmup_seconds)
        for scenario in Scenario:
            if scenario in config.scenarios:
                run.results[scenario] = SCENARIOS[scenario](run)
    return {
        "benchmark": "load",
        "model": MODEL,
        "champion": versions.champion,
        "swapped_with": versions.other,
        "series_ids": len(series_ids),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "token"},
        **{str(scenario): figures for scenario, figures in run.results.items()},
    }


def parse_config(argv: list[str] | None) -> LoadConfig:
    defaults = LoadConfig()
    parser = argparse.ArgumentParser(
        prog="python -m tests.load", description=__doc__.split("\n\n")[0]
    )
    for name in (
        "users",
        "rate",
        "warmup_seconds",
        "steady_seconds",
        "cycles",
        "cycle_requests",
        "probe_users",
        "probe_seconds",
        "overload_seconds",
        "soak_minutes",
    ):
        default = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument(
        "--scenarios",
        default=",".join(defaults.scenarios),
        help=f"comma-separated, of {', '.join(Scenario)}",
    )
    parser.add_argument("--token", default="", help="bearer token, where the server wants one")
    args = vars(parser.parse_args(argv))
    try:
        scenarios = {Scenario(s) for s in args["scenarios"].split(",") if s}
        if Scenario.CYCLES in scenarios:
            scenarios.add(Scenario.STEADY)
        args["scenarios"] = tuple(s for s in Scenario if s in scenarios)
        return LoadConfig(**args)
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    report = run_scenarios(Settings.from_env(), config)
    missed = [s for s in config.scenarios if report[str(s)].get("met") is False]
    report["missed"] = [str(s) for s in missed]
    print(json.dumps(report))
    if missed:
        _say(f"targets missed: {', '.join(missed)}")
    return 1 if missed else 0
