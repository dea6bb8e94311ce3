"""`make demo`: the whole platform on this machine. Every model family's KFP pipeline runs
through kfp.local at a demo budget (each registers its model in MLflow and gates it), then one
`contentml serve` is called once per family and per task route, a batch job of 150 items is run
to `done` by a worker, and one JSON line sums it up. A second run reuses the champions it finds;
`--retrain` trains new versions (of every family, or of those it names), which become champion
only through their gates.

Progress goes to stderr (tqdm bars: pipeline steps, with each step's latest epoch or trial);
stdout carries only the summary line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
from tqdm import tqdm

from contentml import launch, registry
from contentml.errors import UserError
from contentml.settings import Settings
from serving.caller.client import ContentMLClient
from training.data import load_youtube_trending
from training.revenue.channel_settings import has_study
from training.trend.backtest import read_m4_series

READY_TIMEOUT_SECONDS = 120.0
"""Loading every champion (MLflow, Feast, Prophet, torch imports) takes seconds, not minutes."""

PARALLEL_PIPELINES = 2
"""Pipelines run at once: one per core of the smallest machine the demo is for."""

POLL_SECONDS = 0.5

BATCH_ITEMS = 150
BATCH_TIMEOUT_SECONDS = 300.0

WINDOW = 14 * 24
"""Hours of history per batch item."""

HORIZON = 48

REVENUE_STUDY = "demo-channel"
"""The Optuna study of channel settings the demo's optimization run publishes."""

REVENUE_EXPERIMENT = "demo-thumbnails"
"""The bandit experiment the demo chooses an arm of and rewards."""

NICHE_CATEGORY = "Music"
"""A niche the demo trains, and the category of the video it asks the niche router about."""


class DemoFailed(UserError):
    """A stage of the demo failed; the message says which and where its log is."""


@dataclass(frozen=True)
class DemoStage:
    """One model family's pipeline, at the demo's budget."""

    family: str
    pipeline: str
    arguments: dict[str, Any]
    model: str | None
    """The registered model whose champion the pipeline makes; None for revenue, whose state
    is an Optuna study (the bandit itself learns online, from rewards)."""


def demo_stages(settings: Settings, max_series: int, outcomes: Path) -> list[DemoStage]:
    """The demo's budgets, ordered so that two at a time end together (niche takes as long as
    quality and then trend; script and revenue follow niche)."""
    return [
        DemoStage(
            "niche",
            "niche-automl",
            {"budget_minutes": 1.0, "niches": f"{NICHE_CATEGORY},Entertainment"},
            "niche-global",
        ),
        DemoStage("quality", "quality-training", {"epochs": 1, "max_train_rows": 1000}, "quality"),
        DemoStage("trend", "training", {"max_series": max_series}, "trend"),
        DemoStage("script", "script-finetune", {"max_steps": 60}, "script"),
        DemoStage(
            "revenue",
            "optimization",
            {"outcomes_path": str(outcomes), "studies": REVENUE_STUDY},
            None,
        ),
    ]


def _say(message: str) -> None:
    tqdm.write(f"[demo] {message}", file=sys.stderr)


def _trained(settings: Settings, client: registry.RegistryClient, stage: DemoStage) -> bool:
    if stage.model is None:
        return has_study(settings, REVENUE_STUDY)
    return registry.alias_version(client, stage.model, registry.Alias.CHAMPION) is not None


# --- the pipelines, as child processes ------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_STARTED = re.compile(r"Executing task '([^']+)'")
_TASK_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_PROGRESS = re.compile(r"\bepoch \d+|\bTrial \d+ (?:finished|pruned)")
"""Lines of a task's log worth showing beside its bar: a finished epoch or trial."""


@dataclass
class _PipelineRun:
    stage: DemoStage
    process: subprocess.Popen
    log: Path
    bar: tqdm
    started: float = field(default_factory=time.monotonic)
    _lines: IO[str] | None = None

    def follow(self) -> None:
        """Read the log's new lines: a finished task moves the bar, an epoch or trial line
        shows beside it."""
        if self._lines is None:
            self._lines = self.log.open(encoding="utf-8", errors="replace")
        for raw in self._lines:
            line = _ANSI.sub("", raw)
            if started := _TASK_STARTED.search(line):
                self.bar.set_postfix_str(started.group(1))
            elif finished := _TASK_FINISHED.search(line):
                self.bar.update(1)
                self.bar.set_postfix_str(f"{finished.group(1)} {finished.group(2).lower()}")
            elif progress := _PROGRESS.search(line):
                self.bar.set_postfix_str(line[progress.start() :].strip()[:70])

    def close(self) -> None:
        self.bar.close()
        if self._lines is not None:
            self._lines.close()


def _start(settings: Settings, stage: DemoStage, position: int) -> _PipelineRun:
    log = settings.home / "demo" / "logs" / f"{stage.pipeline}.log"
    # Each pipeline gets its share of the cores: native threads fighting over them (torch's
    # OpenMP spins) would slow both runs down far more.
    threads = str(max(1, (os.cpu_count() or 1) // PARALLEL_PIPELINES))
    process = launch.spawn_local(
        settings, stage.pipeline, stage.arguments, log, {"OMP_NUM_THREADS": threads}
    )
    bar = tqdm(
        desc=f"{stage.family:<8} {stage.pipeline}",
        unit=" steps",
        position=position,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    return _PipelineRun(stage, process, log, bar)


def run_pipelines(settings: Settings, stages: list[DemoStage]) -> dict[str, float]:
    """Run each stage's pipeline (`contentml pipeline run NAME --local`), `PARALLEL_PIPELINES`
    at a time; returns the seconds each took. A failed pipeline stops the others and raises
    `DemoFailed` naming its log."""
    waiting, running, seconds = list(stages), [], {}
    try:
        while waiting or running:
            while waiting and len(running) < PARALLEL_PIPELINES:
                running.append(_start(settings, waiting.pop(0), len(seconds) + len(running)))
            time.sleep(POLL_SECONDS)
            for run in list(running):
                run.follow()
                if run.process.poll() is None:
                    continue
                run.follow()
                running.remove(run)
                run.close()
                if run.process.returncode != 0:
                    raise DemoFailed(
                        f"the {run.stage.pipeline} pipeline failed (exit "
                        f"{run.process.returncode}); its log: {run.log}"
                    )
                seconds[run.stage.family] = round(time.monotonic() - run.started, 1)
    finally:
        for run in running:
            run.process.terminate()
            run.process.wait()
            run.close()
    return seconds


# --- the model server and batch workers, as child processes ---------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def model_server(
    settings: Settings, port: int, *serve_args: str, log: Path | None = None
) -> Iterator[str]:
    """`contentml serve [SERVE_ARGS]` as a child process, yielded once `/v2/health/ready`
    answers 200. Its output goes to the file `log`, by default to this process's stderr."""
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as files:
        output = files.enter_context(log.open("ab")) if log is not None else sys.stderr
        process = subprocess.Popen(
            [sys.executable, "-m", "entrypoints.cli", "serve", "--port", str(port), *serve_args],
            env={**os.environ, **settings.to_env()},
            stdout=output,  # never stdout: it carries only the demo's summary line
            stderr=output,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"model server exited with status {process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"model server not ready after {READY_TIMEOUT_SECONDS} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def trend_items(settings: Settings, count: int) -> list[dict]:
    """`count` batch items: distinct two-week windows of the M4 hourly series (so no answer
    comes from a cache), each with an `id`."""
    series = read_m4_series(settings.data_dir / "m4-hourly" / "Hourly-train.csv")
    items: list[dict] = []
    offset = 0
    while len(items) < count:
        for name, values in series.items():
            end = len(values) - offset
            if end >= WINDOW:
                window = np.asarray(values[end - WINDOW : end], dtype=float)
                items.append({"id": f"{name}-{offset}", "history": window.tolist()})
            if len(items) == count:
                break
        offset += 24
    return [{**item, "horizon": HORIZON} for item in items]


def trending_video(settings: Settings, category: str) -> dict:
    """The niche router's input for the newest trending video of `category` in the data."""
    videos = load_youtube_trending(settings.data_dir)
    row = videos[videos["category"] == category].sort_values("event_timestamp").iloc[-1]
    return {
        "category": category,
        "channel_id": row["channel_id"],
        "country": row["country"],
        "title": row["title"],
        "tags": row["tags"] or "",
        "views": int(row["views"]),
        "likes": int(row["likes"]),
        "dislikes": int(row["dislikes"]),
        "comment_total": int(row["comment_total"]),
        "trending_date": row["event_timestamp"].date().isoformat(),
    }


# --- calling every family -------------------------------------------------------------------


def _bearer(token: str) -> dict[str, str]:
    """The authorization header carrying `token`; none for an empty one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass
class _Caller:
    """What the family calls share: the server, the client the content pipeline uses, and
    plain HTTP for the routes the client has no method for."""

    settings: Settings
    url: str
    client: ContentMLClient
    http: httpx.Client

    def post(self, path: str, body: Any, *, admin: bool = False) -> dict:
        """POST `body`; with the admin token (`admin`) on an admin route."""
        headers = _bearer(self.settings.admin_token) if admin else None
        response = self.http.post(path, json=body, headers=headers)
        if response.status_code >= 300:
            raise DemoFailed(f"POST {path} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def task_route(self, route: str, body: dict) -> dict:
        """One call of a backend task route: its status and milliseconds."""
        started = time.perf_counter()
        self.post(route, body)
        return {route: {"status": 200, "ms": round((time.perf_counter() - started) * 1000, 1)}}


def _call_trend(c: _Caller) -> dict:
    by_id = c.client.predict_trend(series_id="H1", horizon=HORIZON)
    by_history = c.client.predict_trend(history=by_id["forecast"] * 2, horizon=24)
    _say(f"trend H1: {by_id['direction']} over 48 h; from a history: {by_history['direction']}")
    history = [float(x) for x in by_id["forecast"] * 4]
    return {
        "endpoint": f"{c.url}/v1/models/trend:predict",
        "direction": by_id["direction"],
        "tasks": c.task_route("/predict/trend", {"history": history, "horizon": HORIZON}),
    }


def _call_quality(c: _Caller) -> dict:
    quality = c.client.score_quality("How to fix a leaky faucet in five minutes", "title")
    _say(f"quality: {quality['decision']} (score {quality['score']:.2f})")
    return {
        "endpoint": f"{c.url}/v1/models/quality:predict",
        "decision": quality["decision"],
        "tasks": c.task_route("/score/quality", {"text": "Ten minute pasta for busy weeknights"}),
    }


def _call_niche(c: _Caller) -> dict:
    video = trending_video(c.settings, NICHE_CATEGORY)
    (niche,) = c.post("/v1/models/niche:predict", {"instances": [video]})["predictions"]
    _say(f"niche router: {niche['model']}, log views gained {niche['log_views_gained']:.2f}")
    return {"endpoint": f"{c.url}/v1/models/niche:predict", "routed_to": niche["model"]}


def _call_script(c: _Caller) -> dict:
    script = c.client.generate_script(
        "fixing a leaky faucet", "a cheerful DIY channel", max_tokens=64
    )
    _say(f"script (chat completion): {script[:60]!r}...")
    body = {"topic": "weeknight pasta", "persona": "a calm cooking channel"}
    return {
        "endpoint": f"{c.url}/openai/v1/chat/completions",
        "text": script[:80],
        "tasks": c.task_route("/generate/script", body),
    }


def _call_revenue(c: _Caller) -> dict:
    instance = {"experiment": REVENUE_EXPERIMENT, "arms": ["bold", "plain"]}
    (choice,) = c.post("/v1/models/revenue:predict", {"instances": [instance]})["predictions"]
    reward = {"arm": choice["arm"], "reward": 1.0}
    c.post(f"/v1/experiments/{REVENUE_EXPERIMENT}/rewards", reward, admin=True)
    _say(f"revenue bandit: chose {choice['arm']!r}, rewarded 1.0")
    return {"endpoint": f"{c.url}/v1/models/revenue:predict", "arm": choice["arm"]}


CALLS: dict[str, Callable[[_Caller], dict]] = {
    "trend": _call_trend,
    "quality": _call_quality,
    "niche": _call_niche,
    "script": _call_script,
    "revenue": _call_revenue,
}
"""Family -> one call of its model (client or V1 route) and of its task route, if it has one;
returns the endpoint, one field of the answer, and `tasks`: {route: {status, ms}}."""

FAMILIES = tuple(CALLS)


def call_families(settings: Settings, url: str, families: Sequence[str]) -> dict[str, dict]:
    """Each family's calls, in order; a refused or failed call raises `DemoFailed` (the
    client raises its own errors, which name the task and the server's message)."""
    token = settings.api_token or None
    with (
        ContentMLClient(url, api_key=token) as client,
        httpx.Client(base_url=url, timeout=60.0, headers=_bearer(settings.api_token)) as http,
    ):
        caller = _Caller(settings, url, client, http)
        return {family: CALLS[family](caller) for family in families}


def run_batch(settings: Settings, url: str) -> dict:
    """`BATCH_ITEMS` trend items as one `POST /batch/trend` job, answered by a worker."""
    items = trend_items(settings, BATCH_ITEMS)
    with httpx.Client(base_url=url, timeout=60.0, headers=_bearer(settings.api_token)) as http:
        response = http.post("/batch/trend", json={"items": items})
        if response.status_code != 202:
            raise DemoFailed(f"POST /batch/trend answered {response.status_code}: {response.text}")
        job_id = response.json()["job_id"]
        # Answered by the server's own batch worker (`contentml serve --workers`).
        with tqdm(total=len(items), desc="batch    trend", unit=" items", file=sys.stderr) as bar:
            deadline = time.monotonic() + BATCH_TIMEOUT_SECONDS
            while True:
                report = http.get(f"/batch/jobs/{job_id}").json()
                bar.update(report["succeeded"] + report["failed"] - bar.n)
                if report["status"] in ("done", "failed"):
                    break
                if time.monotonic() > deadline:
                    raise DemoFailed(f"batch job {job_id} not done after {BATCH_TIMEOUT_SECONDS} s")
                time.sleep(POLL_SECONDS)
    return {key: report[key] for key in ("job_id", "status", "total", "succeeded", "failed")}


def _registered(settings: Settings) -> dict[str, dict]:
    client = registry.connect(settings)
    return {
        m["name"]: {"version": m["aliases"].get("champion"), "aliases": m["aliases"]}
        for m in registry.list_models(client)
    }


@contextlib.contextmanager
def _timed(stage_seconds: dict[str, float], stage: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    stage_seconds[stage] = round(time.monotonic() - started, 1)


def _first_day_outcomes(settings: Settings) -> Path:
    """The optimization pipeline's outcomes file: on the demo's first day, none yet."""
    path = settings.home / "demo" / "outcomes.csv"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("study,trial,value\n", encoding="utf-8")
    return path


def run_demo(
    settings: Settings,
    max_series: int = 12,
    retrain: Sequence[str] = (),
    families: Sequence[str] = FAMILIES,
) -> dict:
    """The demo for `families` (all by default); those in `retrain` train new versions even
    where champions exist. Returns the summary line's content."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise UserError(f"demo: families must be some of {', '.join(FAMILIES)}, not {unknown}")
    if outside := sorted(set(retrain) - set(families)):
        raise UserError(f"demo: --retrain names {outside}, not among the demo's {list(families)}")
    started, seconds = time.monotonic(), {}
    _say(f"state folder: {settings.home}")
    client = registry.connect(settings)
    stages = demo_stages(settings, max_series, _first_day_outcomes(settings))
    stages = [s for s in stages if s.family in families]
    to_train = [s for s in stages if s.family in retrain or not _trained(settings, client, s)]
    if reused := [s.family for s in stages if s not in to_train]:
        _say(f"reusing the champions of {', '.join(reused)} (`--retrain` trains new versions)")
    with _timed(seconds, "pipelines"):
        pipeline_seconds = run_pipelines(settings, to_train)

    port = free_port()
    # The script task route's self-hosted provider calls this same server.
    settings = dataclasses.replace(settings, serving_url=f"http://127.0.0.1:{port}")
    log = settings.home / "demo" / "logs" / "server.log"
    _say(f"starting the model server on port {port} (its log: {log})")
    with contextlib.ExitStack() as stack:
        with _timed(seconds, "server_start"):
            url = stack.enter_context(model_server(settings, port, log=log))
        with _timed(seconds, "calls"):
            answers = call_families(settings, url, [f for f in FAMILIES if f in families])
        batch = None
        if "trend" in families:
            with _timed(seconds, "batch"):
                batch = run_batch(settings, url)

    registered = _registered(settings)
    models, tasks = {}, {}
    for family, answer in answers.items():
        tasks |= answer.pop("tasks", {})
        # The niche router answers with `niche-global` and each niche's model behind it.
        name = "niche-global" if family == "niche" else family
        models[family] = {**registered.get(name, {"version": None, "aliases": {}}), **answer}
    if "niche" in models:
        models["niche"]["niches"] = {n: v for n, v in registered.items() if n.startswith("niche-")}
    if "revenue" in models:
        models["revenue"]["study"] = REVENUE_STUDY  # the bandit keeps no version in MLflow
    return {
        "models": models,
        "tasks": tasks,
        "batch": batch,
        "pipelines": {s.family: s.pipeline for s in to_train},
        "stage_seconds": seconds | {f"pipeline_{k}": v for k, v in pipeline_seconds.items()},
        "seconds": round(time.monotonic() - started, 1),
    }
