"""Solve layers, or runs of neurons of one layer, on local worker processes or a Ray cluster.

Neurons are independent problems that share the layer's Gram matrix (qubo.py), so a layer
splits by rows: ``split_layer`` cuts it into ``SolveTask``s that each hold only their rows
(the Gram matrix once), at boundaries where the solver gives the same bits as on the whole
layer (the fast solver's chunks, which fix its random streams; the seed of neal's neuron i is
``seed + i``). ``solve_many`` runs tasks in order on ``workers`` processes, or on Ray when
given an address; ``solve_layer`` does both for one layer and stitches the rows back.

Each local process gets ``cores / workers`` solver threads, so that N processes do not
oversubscribe the cores N times over; BLAS runs on one thread there as everywhere a rounding is
decided (determinism.py), so its thread pool is not even started (the environment says 1).

Worker processes and a local Ray cluster are the run's own: on any exit but success (an
exception, Ctrl-C, SIGTERM raised as ``Interrupted`` by the CLI) the queued tasks are cancelled
and the processes ended at once, not awaited; a worker also dies with its parent (Linux), even
when that is killed outright. A worker that dies or fails raises ``WorkerError``. ``"local"``
always starts a new cluster (never ``RAY_ADDRESS`` or a cluster left running), and
``closing_ray`` shuts down whatever cluster connection the call opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from itertools import pairwise
from multiprocessing import get_context
from typing import Any, ParamSpec, TypeVar

import numpy as np

from ..core.determinism import one_blas_thread
from ..core.errors import Interrupted, OptionError, QuboError, RuntimeFailure, WorkerError
from ..core.grid import Rounding
from ..core.progress import Progress
from .qubo import LayerProblem
from .solvers import SOLVERS, FastSolver, NealSolver, RoundToNearest

RAY_CONNECT_TIMEOUT = 5.0  # seconds to reach a Ray head before giving up with a clear error
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
STOP_SECONDS = 5.0  # how long an ended worker may take to exit before it is killed
Params = ParamSpec("Params")
Result = TypeVar("Result")
_ray_started_here = False  # whether this module's ray.init opened the current Ray connection


@dataclass(frozen=True, eq=False)
class SolveTask:
    """One solve: the rows ``rows`` of a layer of ``layer_rows`` neurons (``problem`` holds
    only those rows, and the layer's whole Gram matrix), by solver ``solver`` (a name in
    ``SOLVERS``) built with ``params``. ``first_chunk``: for ``fast``, the index of the
    layer's chunk the rows start at."""

    problem: LayerProblem
    solver: str
    seed: int
    rows: slice
    layer_rows: int
    first_chunk: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)

    @one_blas_thread()
    def run(self, threads: int | None = None) -> np.ndarray:
        """The rows' rounding choice (bool [rows, m]); ``threads``: the fast solver's threads."""
        if self.solver == FastSolver.name:
            params = dict(self.params)
            if threads is not None:
                params["workers"] = threads
            return FastSolver(**params).solve_part(self.problem, self.seed, self.layer_rows, self.first_chunk)
        if self.solver == NealSolver.name:  # neuron i is sampled with seed + i
            return NealSolver(**self.params).solve(self.problem, self.seed + self.rows.start, Progress())
        return SOLVERS[self.solver](**self.params).solve(self.problem, self.seed, Progress())


def rows_of(problem: LayerProblem, rows: slice) -> LayerProblem:
    """The problem of some of a layer's neurons (the Gram matrix is shared, not copied)."""
    r = problem.rounding
    step = problem.step if problem.step.shape[0] == 1 else problem.step[rows]
    return LayerProblem(problem.gram, step, Rounding(r.base[rows], r.frac[rows], r.free[rows], r.digits),
                        problem.cross[rows], problem.offset[rows])


def split_layer(problem: LayerProblem, solver: str, seed: int, parts: int,
                params: Mapping[str, Any] | None = None) -> list[SolveTask]:
    """Cut a layer into at most ``parts`` tasks whose results, stacked, are the whole layer's
    solve, bit for bit. Solvers without such boundaries (``exact``) give one task."""
    if solver not in SOLVERS:
        raise OptionError(f"unknown solver '{solver}'; choose one of {', '.join(SOLVERS)}", "solver")
    params = dict(params or {})
    n, f = problem.shape
    if solver == FastSolver.name:
        runs = FastSolver(**params).split(n, f, parts)
    elif solver in (NealSolver.name, RoundToNearest.name):
        bounds = np.linspace(0, n, min(parts, n) + 1).round().astype(int)
        runs = [(slice(int(a), int(b)), 0) for a, b in pairwise(bounds)]
    else:
        runs = [(slice(0, n), 0)]
    return [SolveTask(rows_of(problem, rows), solver, seed, rows, n, first, params) for rows, first in runs]


def solve_many(tasks: Sequence[SolveTask], workers: int = 1, ray_address: str | None = None) -> list[np.ndarray]:
    """Each task's choice, in order: in this process (``workers`` 1), on ``workers`` local
    processes, or on the Ray cluster at ``ray_address`` ("local" starts one on this machine)."""
    if workers < 1:
        raise OptionError(f"workers must be 1 or more, got {workers}", "workers")
    if ray_address is not None:
        return _solve_on_ray(tasks, ray_address)
    if workers == 1 or len(tasks) <= 1:
        return [task.run() for task in tasks]
    threads = max(1, (os.cpu_count() or 1) // workers)
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: "1" for name in THREAD_VARIABLES})  # inherited by the new processes
    try:
        pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=get_context("spawn"),
                                   initializer=_start_worker, initargs=(os.getpid(),))
        try:
            futures = [pool.submit(_run_task, task, threads) for task in tasks]  # starts the processes
            results = [future.result() for future in futures]
            pool.shutdown()
        except BaseException as error:
            _stop(pool)
            failure = _worker_error(error)
            if failure is error:
                raise
            raise failure from error
        return results
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def solve_layer(problem: LayerProblem, solver: str, seed: int = 0, workers: int = 1,
                ray_address: str | None = None, params: Mapping[str, Any] | None = None,
                parts: int | None = None) -> np.ndarray:
    """One layer's choice (bool [n, m]), its rows solved as ``parts`` tasks (default: one per
    worker, or one per CPU of the Ray cluster) by ``solve_many``: the same bits as one solve."""
    count = parts or (workers if ray_address is None else _ray_cpus(ray_address))
    tasks = split_layer(problem, solver, seed, max(1, count), params)
    return np.concatenate(solve_many(tasks, workers, ray_address))


def _run_task(task: SolveTask, threads: int) -> np.ndarray:
    return task.run(threads)


def _start_worker(parent: int) -> None:
    """Worker start: die with the parent (Linux; so that not even SIGKILL of the run orphans a
    worker), leave Ctrl-C to the parent (which ends its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took hold
        os._exit(1)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the tasks not started and end the pool's processes now: a running task is not
    waited for (``shutdown`` alone would finish every queued one first). Then wait for the pool's
    manager thread to end: it closes the pool's wakeup pipe as it goes, and if that came while the
    interpreter's exit hook writes to the pipe, the run ended with an OSError traceback after its
    one-line error (CPython 3.11's concurrent.futures races there; about 1 run in 25 was hit)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # public only from Python 3.14 on
    manager = getattr(pool, "_executor_manager_thread", None)  # private too; shutdown forgets it
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
    if manager is not None:
        manager.join(STOP_SECONDS)


def _worker_error(error: BaseException) -> BaseException:
    """What a failed solve raises: the library's own errors and interrupts as they are, a
    worker that died or failed otherwise as a ``WorkerError`` in one line."""
    if isinstance(error, BrokenProcessPool):
        return WorkerError("a worker process died while solving (killed, or out of memory?)")
    if isinstance(error, (QuboError, KeyboardInterrupt)) or not isinstance(error, Exception):
        return error
    return WorkerError(f"a worker process failed: {type(error).__name__}: {error}")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OptionError("solving on Ray needs the ray package: pip install 'onnx-qubo[ray]'",
                          "ray_address") from None
    return ray


def connect(address: str) -> None:
    """Reach (or, for "local", start) the Ray cluster now, so that a wrong address fails before
    any long work."""
    _connect_ray(address)


def closing_ray(function: Callable[Params, Result]) -> Callable[Params, Result]:
    """``function``, after which (returned, raised or interrupted) the Ray connection it opened
    is shut down: a local cluster it started ends with its processes, a remote one is left
    running. A connection the caller opened before stays open."""
    @functools.wraps(function)
    def call(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        opened_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
        try:
            return function(*args, **kwargs)
        finally:
            if not opened_before:
                shutdown_ray()
    return call


def shutdown_ray() -> None:
    """Shut down the Ray connection this module opened (a local cluster with it), if any."""
    global _ray_started_here
    if _ray_started_here:
        _ray_started_here = False
        sys.modules["ray"].shutdown()


def _connect_ray(address: str) -> Any:
    """``ray.init`` for ``address`` ("local": a new local cluster, whatever ``RAY_ADDRESS`` or a
    cluster left running say), after checking within ``RAY_CONNECT_TIMEOUT`` that a remote head
    answers (Ray itself retries for minutes). Keeps this process's SIGTERM handler (ray.init
    replaces it with one that exits from inside Ray's waits, which aborts the process)."""
    global _ray_started_here
    if address != "local":  # checked first: a wrong address is the likelier mistake
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=RAY_CONNECT_TIMEOUT).close()
        except (OSError, ValueError) as error:
            raise OptionError(f"{{ray_address}} '{address}': cannot reach the Ray cluster within "
                              f"{RAY_CONNECT_TIMEOUT:.0f} s ({error})", "ray_address") from None
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    _ray_started_here = True  # before init: an interrupted start still has processes to end
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False,
                 configure_logging=False)
    except Exception as error:  # noqa: BLE001 (Ray raises ConnectionError, RuntimeError, ValueError...)
        shutdown_ray()
        raise RuntimeFailure(f"cannot start Ray at '{address}': {error}") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)
    return ray


def _ray_cpus(address: str) -> int:
    return max(1, int(_connect_ray(address).cluster_resources().get("CPU", 1)))


def _solve_on_ray(tasks: Sequence[SolveTask], address: str) -> list[np.ndarray]:
    """One Ray task per SolveTask; each distinct Gram matrix is put in the object store once.
    On any failure or interrupt the tasks on a remote cluster are cancelled; a local cluster
    started here ends with its tasks when ``closing_ray`` shuts it down (cancelling them first
    races with their completion inside Ray, which can abort the process)."""
    ray = _connect_ray(address)
    remote = ray.remote(_run_ray_task)
    grams: dict[int, Any] = {}
    futures: list[Any] = []
    with _interrupts_kept() as received:
        try:
            for task in tasks:
                gram = task.problem.gram
                if id(gram) not in grams:
                    grams[id(gram)] = ray.put(gram)
                futures.append(remote.remote(replace(task, problem=replace(task.problem, gram=np.empty((0, 0)))),
                                             grams[id(gram)]))
            results = ray.get(futures)
            if received:  # the Interrupted the handler raised was swallowed in one of Ray's callbacks
                raise Interrupted(received[0])
            return results
        except BaseException as error:
            ends_with_us = address == "local" and _ray_started_here  # closing_ray shuts the cluster down
            for future in [] if ends_with_us else futures:  # no task left running on the cluster
                try:
                    ray.cancel(future, force=True)
                except Exception:  # noqa: BLE001 (finished, or the cluster is gone)
                    pass
            if received and not isinstance(error, Interrupted):  # Ray re-raises a plain KeyboardInterrupt
                raise Interrupted(received[0]) from None
            failure = _ray_error(ray, error)
            if failure is error:
                raise
            raise failure from error


@contextlib.contextmanager
def _interrupts_kept() -> Iterator[list[int]]:
    """While active (main thread), SIGINT and SIGTERM (unless ignored) raise ``Interrupted`` and
    are listed in the list it gives: Ray turns an exception raised in its waits into a plain
    KeyboardInterrupt, and drops one raised inside some of its callbacks, which would let an
    interrupted run finish and write its output."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise Interrupted(signum)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, interrupt)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _ray_error(ray: Any, error: BaseException) -> BaseException:
    """What a failed Ray solve raises: the library's own error a task raised, interrupts as
    they are, anything else Ray reports (a task's error, a worker or node lost) as a
    ``WorkerError`` in one line."""
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, QuboError):
        return error.cause
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = getattr(error, "cause", None) or error
        return WorkerError(f"a Ray task failed: {type(cause).__name__}: {_first_line(cause)}")
    if isinstance(error, ray.exceptions.RayError):
        return WorkerError(f"a Ray task was lost: {type(error).__name__}: {_first_line(error)}")
    return error


def _first_line(error: BaseException) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), "no message")


def _run_ray_task(task: SolveTask, gram: np.ndarray) -> np.ndarray:
    return replace(task, problem=replace(task.problem, gram=gram)).run(threads=1)
