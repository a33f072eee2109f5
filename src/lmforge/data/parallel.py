"""An ordered, bounded parallel map for the data stages.

`Pool.imap` reads its whole input ahead of the workers, so memory would grow with the corpus; this keeps at most
`2 * workers` chunks in flight and yields results in input order, so output is identical for any worker count.
With one worker it runs in-process (no pickling, easy to debug and to test).
It does not chunk records or decide what work is worth parallelising.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` over `workers` processes; `fn` must be a module-level function."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with mp.get_context("spawn" if os.name != "posix" else "fork").Pool(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
