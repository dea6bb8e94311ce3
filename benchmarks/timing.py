"""Latency figures every benchmark reports the same way."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def percentiles(call: Callable[[], object], count: int) -> dict[str, float]:
    call()  # warm-up: first-call imports and connections are not steady state
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        timings.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": round(statistics.median(timings), 2),
        "p99_ms": round(float(np.percentile(timings, 99)), 2),
        "calls": count,
    }
