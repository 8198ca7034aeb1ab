"""A run owns its worker processes and its local Ray cluster: SIGINT, SIGTERM or a dead worker
ends every one of them promptly, with the documented exit status, one line and no output.

Each test runs ``python -m onnx_qubo`` on a model whose solve lasts a few seconds, watches the
run's process tree (/proc) and interrupts it once the workers are up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import onnx
import pytest
import runs

from onnx_qubo.core.errors import SolverLimitError, WorkerError
from onnx_qubo.rounding import workers
from onnx_qubo.rounding.workers import SolveTask, solve_many

from graphs import mlp_model
from problems import random_problem

ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 180  # a loaded 2-core machine: imports, calibration, a Ray cluster's start
PROMPT_SECONDS = 8  # from the signal to the run's exit (it took 12-16 s to finish a layer's tasks)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree in /proc")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _sigint_by_default() -> None:
    """The child as a terminal would start it: a test run in the background (SIGINT ignored, as
    a non-interactive shell leaves it for `cmd &`) must still be able to Ctrl-C its runs."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """``onnx-qubo`` on ``folder/m.onnx`` in a child process; remembers every process it started."""

    def __init__(self, folder: Path, *flags: str, env: dict[str, str] | None = None):
        self.folder, self.output, self.seen = folder, folder / "out" / "o.onnx", set[int]()
        self.output.parent.mkdir()
        self.stderr = (folder / "stderr.txt").open("w+")
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-m", "onnx_qubo", str(folder / "m.onnx"), str(self.output),
                                         "--quiet", "--no-speed", *flags], cwd=folder, env=environment,
                                        stdout=subprocess.DEVNULL, stderr=self.stderr,
                                        preexec_fn=_sigint_by_default)

    def wait_for(self, started: Callable[[list[str]], bool]) -> None:
        """Until ``started`` holds for the command lines of the run's processes."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self.process.poll() is None:
            tree = descendants(self.process.pid)
            self.seen.update(tree)
            if started([command_line(pid) for pid in tree]):
                return
            time.sleep(0.1)
        raise AssertionError(f"the run's processes did not start in {START_SECONDS} s: {self.errors()}")

    def stop(self, signum: int) -> float:
        """Send ``signum``; the seconds until the run exits."""
        self.seen.update(descendants(self.process.pid))
        sent = time.monotonic()
        self.process.send_signal(signum)
        try:
            self.process.wait(PROMPT_SECONDS * 4)
        except subprocess.TimeoutExpired:
            pass
        return time.monotonic() - sent

    def survivors(self, grace: float = 5) -> list[int]:
        """The run's processes still running ``grace`` seconds on (the resource tracker exits when
        it reads its pipe's end)."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(pid) for pid in self.seen):
            time.sleep(0.1)
        return [pid for pid in self.seen if alive(pid)]

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def end(self) -> None:
        """Kill whatever is left (a failing test must not leave processes behind)."""
        for pid in [self.process.pid, *self.seen]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self.stderr.close()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """Three 512-wide layers: each layer's solve takes seconds on 2 workers."""
    onnx.save(mlp_model(widths=(512, 512, 512, 512)), tmp_path / "m.onnx")
    np.savez(tmp_path / "m.calib.npz", x=np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32))
    return tmp_path


@pytest.fixture
def run(model_dir: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> Run:
        runs.append(Run(model_dir, *flags, env=env))
        return runs[-1]
    yield start
    for started in runs:
        started.end()


def workers_up(count: int) -> Callable[[list[str]], bool]:
    return lambda lines: sum("--multiprocessing-fork" in line for line in lines) >= count


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_interrupt_ends_every_worker_process_promptly(run, signum):
    started = run("--workers", "2")
    started.wait_for(workers_up(2))
    seconds = started.stop(signum)
    name = signal.Signals(signum).name
    assert started.process.returncode == 128 + signum, started.errors()
    assert seconds < PROMPT_SECONDS
    assert last_line(started.errors()) == f"Error: interrupted by {name}" and "Traceback" not in started.errors()
    assert started.survivors() == []
    assert list(started.output.parent.iterdir()) == []


@pytest.mark.slow
def test_workers_die_with_a_run_killed_outright(run):
    """SIGKILL cannot be handled: a worker dies with its parent once started (Linux), and one
    still importing when the parent dies exits as soon as its start sees it gone."""
    started = run("--workers", "2")
    started.wait_for(workers_up(2))
    started.stop(signal.SIGKILL)
    assert started.process.returncode == -signal.SIGKILL
    assert started.survivors(grace=60) == []


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_with_one_line(run):
    started = run("--workers", "2")
    started.wait_for(workers_up(1))
    worker = next(pid for pid in descendants(started.process.pid) if "--multiprocessing-fork" in command_line(pid))
    os.kill(worker, signal.SIGKILL)
    started.stop(0)  # signal 0: only waits
    assert started.process.returncode == WorkerError.exit_code, started.errors()
    assert last_line(started.errors()) == "Error: a worker process died while solving (killed, or out of memory?)"
    assert "Traceback" not in started.errors()
    assert started.survivors() == []
    assert list(started.output.parent.iterdir()) == []


@pytest.mark.slow
def test_a_failing_worker_is_a_worker_error_and_the_librarys_errors_pass_through():
    problem = random_problem(n=4, f=6)
    broken = [SolveTask(problem, "fast", 0, slice(0, 4), 4, params={"no_such_option": 1})] * 2
    with pytest.raises(WorkerError, match="a worker process failed: TypeError: .*no_such_option"):
        solve_many(broken, workers=2)
    too_big = [SolveTask(random_problem(n=2, f=45), "exact", 0, slice(0, 2), 2)] * 2
    with pytest.raises(SolverLimitError):
        solve_many(too_big, workers=2)


@pytest.mark.slow
def test_a_stopped_pool_leaves_no_manager_thread_to_race_the_exit_hook():
    """Stopping a pool mid-task ends its processes and then its manager thread: a manager thread
    still closing the pool's pipes when the interpreter's exit hook wrote to them ended an
    interrupted run with an OSError traceback after its one-line error (2 of 65 interrupted runs
    in a stress loop). Before the fix the thread outlived the stop in 12 of 20 tries."""
    for _ in range(5):
        pool = ProcessPoolExecutor(2, mp_context=get_context("spawn"))
        running = [pool.submit(time.sleep, 60) for _ in range(2)]
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and not all(future.running() for future in running):
            time.sleep(0.02)
        managers = [t for t in threading.enumerate() if type(t).__name__ == "_ExecutorManagerThread"]
        assert managers  # the pool's, alive while its tasks run
        workers._stop(pool)
        assert not any(manager.is_alive() for manager in managers)


def ray_tasks_running(lines: list[str]) -> bool:
    return any("_run_ray_task" in line for line in lines)


@pytest.mark.ray
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_ray_local_starts_its_own_cluster_and_an_interrupt_ends_it(run, signum):
    """A dead RAY_ADDRESS (or a cluster left running) does not matter to --ray local: it starts
    a cluster of its own, whose processes all end with the interrupted run."""
    pytest.importorskip("ray")
    started = run("--ray", "local", env={"RAY_ADDRESS": "127.0.0.1:1"})
    started.wait_for(ray_tasks_running)
    seconds = started.stop(signum)
    assert started.process.returncode == 128 + signum, started.errors()
    assert seconds < PROMPT_SECONDS * 2  # the cluster's shutdown takes a few seconds
    assert last_line(started.errors()) == f"Error: interrupted by {signal.Signals(signum).name}"
    assert "Traceback" not in started.errors() and "SIGTERM received" not in started.errors()
    assert started.survivors() == []
    assert list(started.output.parent.iterdir()) == []


@pytest.mark.slow
def test_ray_errors_become_one_line():
    ray = pytest.importorskip("ray")
    from onnx_qubo.rounding.workers import _ray_error

    limit = SolverLimitError("exact solver: 45 free weights, over its limit")
    assert _ray_error(ray, ray.exceptions.RayTaskError("_run_ray_task", "Traceback...", limit)) is limit
    failed = _ray_error(ray, ray.exceptions.RayTaskError("_run_ray_task", "Traceback...", MemoryError("out")))
    assert isinstance(failed, WorkerError) and str(failed) == "a Ray task failed: MemoryError: out"
    crashed = _ray_error(ray, ray.exceptions.WorkerCrashedError())
    assert isinstance(crashed, WorkerError) and str(crashed).startswith("a Ray task was lost: WorkerCrashedError: ")
    assert "\n" not in str(crashed)
    interrupt = KeyboardInterrupt()
    assert _ray_error(ray, interrupt) is interrupt


def test_the_quantize_api_keeps_a_ray_connection_it_did_not_open(monkeypatch, tmp_path):
    """``closing_ray`` shuts down only what the call opened (no cluster is started here)."""
    ray = pytest.importorskip("ray")
    calls: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    runs.quantize(mlp_model(), tmp_path / "o.onnx", calibration={"x": np.ones((4, 8), np.float32)},
                       solver="rtn", speed=False)
    assert calls == []
