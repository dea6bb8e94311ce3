"""Batch test inputs and a real `contentml batch worker` process, shared by the batch and
event tests."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from collections.abc import Iterator

from contentml.settings import Settings


def trend_items(count: int, prefix: str = "item") -> list[dict]:
    return [
        {
            "id": f"{prefix}-{i}",
            "history": [10 + 5 * math.sin(h * 2 * math.pi / 24) + i % 5 for h in range(72)],
            "horizon": 24,
        }
        for i in range(count)
    ]


@contextlib.contextmanager
def worker(settings: Settings, threads: int = 2) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.cli", "batch", "worker", "--threads", str(threads)],
        env={**os.environ, **settings.to_env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)
