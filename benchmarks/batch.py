"""`make bench`: a batch job's throughput beside the same items sent one by one, measured in the
same run on the demo's trend champion.

1. One by one: each item a `POST /predict/trend` to `contentml serve`, one after another (how
   a caller without batch jobs would do it).
2. Batch: the same items as one `POST /batch/trend` job, answered by `contentml batch worker`
   processes (one per core), from submission until the job is done.
3. While the batch runs, an urgent single `/predict/trend` every quarter second: its latency
   against the 5 s SLA (urgent requests must never wait behind batch work).

Items are real M4 hourly series, cut into distinct two-week windows, so no answer comes from a
cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import httpx
import numpy as np

from contentml import registry
from contentml.settings import Settings
from entrypoints import runner
from entrypoints.demo import HORIZON, free_port, model_server, trend_items
from serving.backend.tasks import TASKS, Task
from serving.server import batch_workers

URGENT_EVERY_SECONDS = 0.25
"""How often an urgent single request is sent while the batch runs."""


def one_by_one(url: str, items: list[dict]) -> float:
    """Seconds to answer every item with one request each."""
    with httpx.Client(base_url=url, timeout=30) as http:
        started = time.perf_counter()
        for item in items:
            body = {k: v for k, v in item.items() if k != "id"}
            http.post("/predict/trend", json=body).raise_for_status()
        return time.perf_counter() - started


def as_batch(url: str, items: list[dict], probe: list[float]) -> dict:
    """Seconds from submitting the job until it is done, and urgent latencies meanwhile."""
    latencies: list[float] = []
    done = threading.Event()

    def urgent_requests() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            shift = 0
            while not done.wait(URGENT_EVERY_SECONDS):
                shift += 1
                body = {"history": np.roll(probe, shift).tolist(), "horizon": HORIZON}
                started = time.perf_counter()
                http.post("/predict/trend", json=body).raise_for_status()
                latencies.append(time.perf_counter() - started)

    with httpx.Client(base_url=url, timeout=120) as http:
        started = time.perf_counter()
        job = http.post("/batch/trend", json={"items": items}).raise_for_status().json()
        prober = threading.Thread(target=urgent_requests)
        prober.start()
        while True:
            report = http.get(f"/batch/jobs/{job['job_id']}").raise_for_status().json()
            if report["status"] in ("done", "failed"):
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        done.set()
        prober.join()
        answered = len(http.get(f"/batch/jobs/{job['job_id']}/results").json())
    return {
        "seconds": seconds,
        "status": report["status"],
        "results": answered,
        "dead_letters": report["failed"],
        "urgent_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "urgent_max_ms": round(max(latencies) * 1000, 1),
        "urgent_requests": len(latencies),
        "urgent_within_sla": all(s <= TASKS[Task.TREND].sla_seconds for s in latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    client = registry.connect(settings)
    if registry.alias_version(client, "trend", registry.Alias.CHAMPION) is None:
        print("[bench] no trend champion yet: running the training pipeline", file=sys.stderr)
        runner.run_local(settings, "training", {"max_series": 24})
    items = trend_items(settings, args.items + 101)
    probe, warm_up, items = items[0]["history"], items[1:101], items[101:]
    # The same items both ways: the workers have no prediction cache, and the server's cache
    # only holds what it answered itself.
    with model_server(settings, free_port(), "--workers", "0") as url:
        one_by_one(url, warm_up)  # first-call imports and fits are not steady state
        single_seconds = one_by_one(url, items)
        with batch_workers(settings, args.workers):
            as_batch(url, warm_up, probe)  # likewise for the workers
            batch = as_batch(url, items, probe)
    single_rate = len(items) / single_seconds
    batch_rate = len(items) / batch["seconds"]
    report = {
        "benchmark": "batch",
        "task": "trend",
        "items": len(items),
        "workers": args.workers,
        "one_by_one_items_per_s": round(single_rate, 2),
        "batch_items_per_s": round(batch_rate, 2),
        "batch_over_one_by_one": round(batch_rate / single_rate, 2),
        **{f"batch_{k}": v for k, v in batch.items() if k != "seconds"},
    }
    print(
        f"[bench] trend: one by one {single_rate:.1f} items/s, batch ({args.workers} workers) "
        f"{batch_rate:.1f} items/s = {batch_rate / single_rate:.2f}x; urgent p50 "
        f"{batch['urgent_p50_ms']} ms, max {batch['urgent_max_ms']} ms during the batch",
        file=sys.stderr,
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
