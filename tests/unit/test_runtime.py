"""`contentml.runtime`: threads that answer requests run one native thread each (the
predictors' pool `PREDICT_THREADS`, the task routes' pools), and `freeze_heap`."""

from __future__ import annotations

import gc
import weakref

import pytest

from contentml.runtime import freeze_heap
from tests.helpers.openmp import SERVER_THREADS, probe_in_child


@pytest.fixture(scope="module")
def limits(tmp_path_factory) -> dict:
    """The limits seen in a child process with two OpenMP threads, as a server on two cores
    runs (the test processes run one: tests/conftest.py)."""
    seen = probe_in_child(tmp_path_factory.mktemp("openmp"))
    assert seen["default"] and set(seen["default"]) == {int(SERVER_THREADS)}, seen
    return seen


def test_a_predictor_answers_on_a_thread_with_one_openmp_thread(limits):
    assert limits["predictor"] == [1] * len(limits["default"])


def test_the_task_routes_answer_on_threads_with_one_openmp_thread(limits):
    assert limits["tasks"] and set(map(tuple, limits["tasks"].values())) == {
        (1,) * len(limits["default"])
    }


def test_the_limit_stays_in_the_thread_that_set_it(limits):
    """OpenMP's limit is per thread: a pool's threads take it, the rest of the process keeps
    its own (training in the same process is not slowed)."""
    assert limits["limited"] == [1] * len(limits["default"])
    assert limits["after_limited"] == limits["default"]


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
