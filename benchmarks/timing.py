"""Latency figures every benchmark reports the same way."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np


def percentiles(call: Callable[[], object], count: int) -> dict[str, float]:
    call()  # warm-up: first-call imports and connections are not steady state
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        timings.append((time.perf_counter() - started) * 1000)
    return summary(timings)


def summary(timings: Sequence[float], unit: str = "ms", digits: int = 2) -> dict[str, float]:
    """p50 and p99 of `timings` (measured in `unit`) and how many there are."""
    return {
        f"p50_{unit}": round(statistics.median(timings), digits),
        f"p99_{unit}": round(float(np.percentile(timings, 99)), digits),
        "calls": len(timings),
    }
