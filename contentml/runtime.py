"""How our processes run native thread pools and the garbage collector; one function per
habit, called from every place that needs it (servers, batch workers, training, load test)."""

from __future__ import annotations

import gc

from threadpoolctl import threadpool_limits


def one_native_thread() -> None:
    """One OpenMP thread for the calling thread (OpenMP's limit is per thread) and one BLAS
    thread (BLAS's is per process). For threads or processes that run beside others doing
    the same work: a thread pool that answers requests, a batch worker, a training worker.

    A request's model is small work cut into many parallel regions (the trend model's boosting
    has one per tree: 500), and each region ends at a barrier that waits for all its threads.
    On a busy machine one of them is off the CPU and the barrier waits with it: a 20 ms trend
    forecast took 4.6 s beside four busy processes on two cores, 25 ms with this. Requests
    are answered in parallel on threads instead."""
    threadpool_limits(1)


def freeze_heap() -> None:
    """Take what is alive now (imported modules, loaded models, a load generator's state:
    about a million objects) out of the garbage collector's sight (`gc.freeze`), once a
    process is set up. Its full collections otherwise walk them all with the GIL held:
    0.4-0.6 s in which no request moved, every few seconds under the load test. Garbage made
    so far is collected first, not frozen."""
    gc.collect()
    gc.freeze()
