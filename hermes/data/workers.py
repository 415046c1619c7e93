"""Mapping a function over a stream of items in worker processes, results in the items' order, with a
bounded number of items in flight.

Start method: forkserver (spawn where there is none). The process that prepares data is a training rank:
by then it runs gloo or NCCL threads and may hold a CUDA context, and forking such a process can deadlock
the child on a lock another thread held (Python 3.12 warns about it). The fork server is started fresh
from the interpreter, before any of that, and imports `__main__` and the function's module once; each
worker is forked from it, so starting 96 workers costs one import, and the workers share its pages. The
function travels to each worker once, pickled (`ProcessPoolExecutor`'s initializer), not with every item.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

IN_FLIGHT_PER_WORKER = 2
"""Items submitted ahead per worker: one running, one queued, so no worker waits for the next item."""

POOL_MIN_ITEMS = 16
"""Fewer items than this run in this process: starting the pool (about 2 s, mostly the fork server's
imports) would cost more than spreading them saves."""

_installed: Callable[[Any], Any] | None = None
"""The function of the pool this worker process belongs to."""


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, as a job scheduler sets it)."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def start_method() -> str:
    """ "forkserver" where the platform has it, else "spawn" (see the module docstring)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def ordered_map(function: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`function(item)` for each item, yielded in the items' order.

    With `workers` > 1 and at least POOL_MIN_ITEMS items, the calls run in a pool of that many processes:
    `function` must pickle, and its module must be importable by the workers. Fewer items run in this
    process. Items are read from `items` only as far ahead of the result being yielded as the pool needs:
    IN_FLIGHT_PER_WORKER x workers of them (submitted, running, or done and waiting for an earlier one),
    or the first POOL_MIN_ITEMS, whichever is more. So memory holds that many items and results, however
    many there are.

    Raises:
        Whatever `function` raises, for the first item (in order) whose call failed; no item is submitted
        after it.
    """
    items = iter(items)
    head = deque(itertools.islice(items, POOL_MIN_ITEMS if workers > 1 else 0))
    items = itertools.chain(_drain(head), items)
    if len(head) < POOL_MIN_ITEMS:
        yield from map(function, items)
        return
    context = multiprocessing.get_context(start_method())
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(["__main__", function.__module__])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_install, initargs=(function,))
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(_call, item))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _drain(queue: deque[T]) -> Iterator[T]:
    """The items of `queue`, each let go of as it is handed over."""
    while queue:
        yield queue.popleft()


def _install(function: Callable[[Any], Any]) -> None:
    global _installed
    _installed = function


def _call(item: Any) -> Any:
    assert _installed is not None, "a worker runs only items of the pool that installed its function"
    return _installed(item)
