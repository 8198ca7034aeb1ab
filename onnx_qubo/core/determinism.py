"""One BLAS thread for the arithmetic that decides a rounding, so results do not depend on threads.

A BLAS or LAPACK call can take another code path, and sum in another order, with another
number of threads (OpenBLAS's single-threaded small-matrix kernels, a Cholesky split across
threads): a last-bit difference in a Gram matrix, a scale search's cost or a solver's residual
can then flip a rounding at a near tie. Every stage whose numbers decide codes (the rotation of
the weights, calibration statistics, scale choice, the QUBO, the solvers, the bias correction) runs under
``one_blas_thread``; the parallelism is the tool's own (the fast solver's chunk threads, worker
processes, Ray tasks), which never splits a reduction. So the same statistics give the same bits
whatever the thread count, worker count or Ray placement, on a given numpy/BLAS build and CPU.

onnxruntime's kernels are not affected (their thread count does not change their results).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import TypeVar

from threadpoolctl import ThreadpoolController


@cache
def _controller() -> ThreadpoolController:
    """The BLAS libraries loaded in this process (numpy's), found once: a lookup costs about a millisecond."""
    import numpy  # noqa: F401  (its BLAS must be loaded before the lookup)

    return ThreadpoolController()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with every BLAS library limited to one thread (restored afterwards).

    The limit is process-wide (BLAS has no per-thread setting): threads the tool starts inside
    the block, such as the fast solver's chunk threads, each run single-threaded BLAS calls."""
    with _controller().limit(limits=1, user_api="blas"):
        yield


T = TypeVar("T")
R = TypeVar("R")


def map_threads(function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[function(item) for item in items]`` on one thread per core (numpy releases the GIL in its
    array loops and BLAS calls). The caller splits the work into ``items`` without looking at the
    core count, so the results do not depend on it; inside ``one_blas_thread`` each BLAS call
    stays single-threaded."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(function, items))
