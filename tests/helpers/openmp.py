"""OpenMP thread limits as a server process sees them, probed in a child process of its own.

The test processes run one OpenMP thread each (tests/conftest.py), so the limits
`contentml.runtime` sets would show nothing there. `python -m tests.helpers.openmp HOME`
runs with `OMP_NUM_THREADS=2`, as a server on two cores does, and prints one JSON object:
the OpenMP limit per runtime loaded in a new thread (`default`), in a predictor's thread
(`predictor`), in each task route's pool (`tasks`), and in a thread that set the limit
and in a thread started after it (`limited`, `after_limited`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

SERVER_THREADS = "2"


def openmp_threads() -> list[int]:
    """The calling thread's OpenMP limit in each OpenMP runtime loaded (sklearn's is)."""
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "openmp"]


def in_new_thread(function):
    result = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


def probe(home: Path) -> dict:
    import sklearn.ensemble  # noqa: F401 (loads sklearn's OpenMP runtime)

    from contentml.runtime import one_native_thread
    from serving.backend.costs import CostLedger
    from serving.backend.tasks import Task, TaskAnswerer
    from serving.model_server.versions import OffLoopModel
    from tests.conftest import make_settings

    class OpenMpProbe(OffLoopModel):
        def predict_now(self, payload, headers=None):
            return openmp_threads()

    def limited_then_another():
        one_native_thread()
        return openmp_threads(), in_new_thread(openmp_threads)

    settings = make_settings(home)
    ledger = CostLedger.from_settings(settings)
    answerer = TaskAnswerer(settings, [], ledger)
    try:
        tasks = {t.value: answerer.executors[t].submit(openmp_threads).result() for t in Task}
    finally:
        answerer.close()
        ledger.close()
    limited, after_limited = in_new_thread(limited_then_another)
    return {
        "default": in_new_thread(openmp_threads),
        "predictor": asyncio.run(OpenMpProbe("probe").predict({})),
        "tasks": tasks,
        "limited": limited,
        "after_limited": after_limited,
    }


def probe_in_child(home: Path) -> dict:
    """`probe` in a child process with `SERVER_THREADS` OpenMP threads."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.openmp", str(home)],
        env={**os.environ, "OMP_NUM_THREADS": SERVER_THREADS},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(probe(Path(sys.argv[1]))))
