"""`contentml.runtime`: threads that answer requests run one native thread each (the
predictors' pool `PREDICT_THREADS`, the task routes' pools), and `freeze_heap`."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest
import sklearn.ensemble  # noqa: F401 (loads sklearn's OpenMP runtime)
from threadpoolctl import threadpool_info

from contentml.runtime import freeze_heap, one_native_thread
from serving.backend.costs import CostLedger
from serving.backend.tasks import Task, TaskAnswerer
from serving.model_server.versions import OffLoopModel


def openmp_threads() -> list[int]:
    """The calling thread's OpenMP limit in each OpenMP runtime loaded (sklearn's is)."""
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "openmp"]


def in_new_thread(function):
    result = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


@pytest.fixture(scope="module")
def default_openmp_threads() -> list[int]:
    """What a thread gets without the limit; the tests need more than one to show anything."""
    threads = in_new_thread(openmp_threads)
    if not threads or max(threads) < 2:
        pytest.skip(f"OpenMP runs {threads} thread(s) here by default: nothing to limit")
    return threads


class OpenMpProbe(OffLoopModel):
    def predict_now(self, payload, headers=None):
        return openmp_threads()


def test_a_predictor_answers_on_a_thread_with_one_openmp_thread(default_openmp_threads):
    assert asyncio.run(OpenMpProbe("probe").predict({})) == [1] * len(default_openmp_threads)


def test_the_task_routes_answer_on_threads_with_one_openmp_thread(default_openmp_threads, settings):
    ledger = CostLedger.from_settings(settings)
    answerer = TaskAnswerer(settings, [], ledger)
    try:
        for task in Task:
            assert answerer.executors[task].submit(openmp_threads).result() == [1] * len(
                default_openmp_threads
            )
    finally:
        answerer.close()
        ledger.close()


def test_the_limit_stays_in_the_thread_that_set_it(default_openmp_threads):
    """OpenMP's limit is per thread: a pool's threads take it, the rest of the process keeps
    its own (training in the same process is not slowed)."""

    def limited_then_another():
        one_native_thread()
        return openmp_threads(), in_new_thread(openmp_threads)

    limited, other = in_new_thread(limited_then_another)
    assert limited == [1] * len(default_openmp_threads)
    assert other == default_openmp_threads


class Node:
    """Weakly referenceable, so a test sees whether the collector freed it."""


def test_freeze_heap_frees_garbage_before_it_freezes():
    cycles = [Node() for _ in range(100)]
    for node in cycles:
        node.self = node  # a cycle: only the collector frees it
    alive = [weakref.ref(node) for node in cycles]
    del cycles, node
    freeze_heap()
    try:
        assert gc.get_freeze_count() > 0
        assert not any(ref() for ref in alive)
    finally:
        gc.unfreeze()
