"""The same command and data give the same bytes whatever the BLAS thread count or worker count.

A BLAS call can take another code path with another thread count (OpenBLAS's single-threaded
small-matrix kernels, a threaded Cholesky), so every stage whose numbers decide codes must run
its BLAS calls on one thread (onnx_qubo/core/determinism.py): checked directly, then end to end in
fresh processes with different ``OPENBLAS_NUM_THREADS`` and ``--workers``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from runs import quantize
from threadpoolctl import threadpool_info, threadpool_limits

from onnx_qubo import layer
from onnx_qubo.calibration import grams
from onnx_qubo.core.grid import IntegerGrid, Scheme
from onnx_qubo.passes import RotateInputs
from onnx_qubo.rounding.qubo import build_problem
from onnx_qubo.rounding.scales import choose_scales
from onnx_qubo.rounding.solvers import fast

from graphs import mlp_model


def blas_threads() -> set[int]:
    return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


@pytest.mark.slow
def test_every_stage_that_decides_codes_runs_blas_on_one_thread(monkeypatch, tmp_path):
    seen: dict[str, set[int]] = {}

    def recording(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.setdefault(name, set()).update(blas_threads())
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    recording(grams.DenseGram, "update")  # calibration statistics
    recording(layer, "choose_scales")  # the scale search
    recording(fast, "feedback_factor")  # the fast solver's Cholesky
    recording(fast, "sequential_start")  # and its matrix products
    recording(fast, "best_start")
    recording(layer.LayerTerms, "mean_error")  # the bias correction
    recording(RotateInputs, "call")  # the rotated weights
    x = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    with threadpool_limits(2, user_api="blas"):
        assert blas_threads() == {2}  # a caller's setting...
        quantize(mlp_model(widths=(64, 48, 10)), tmp_path / "q.onnx", bits=2, calibration={"x": x},
                 bias_correction=True, rotate="whole", speed=False)
        assert blas_threads() == {2}  # ...is restored afterwards
    assert set(seen) == {"update", "choose_scales", "feedback_factor", "sequential_start", "best_start",
                         "mean_error", "call"}
    assert all(threads == {1} for threads in seen.values()), seen


@pytest.mark.slow
def test_the_fast_solver_gives_the_same_bits_whatever_the_callers_blas_threads():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((96, 200))
    x = rng.standard_normal((800, 200)) @ rng.standard_normal((200, 200))
    gram = x.T @ x / len(x)
    problem = build_problem(w, choose_scales("minmax", w, Scheme(8), gram).scale, 0, 1.0, IntegerGrid(8), gram)
    choices = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            choices.append(fast.FastSolver(workers=threads).solve(problem, 0))
    np.testing.assert_array_equal(*choices)


FITTED = ["--scale", "fit", "--float-zero-points", "--granularity", "block", "--block-size", "32"]


@pytest.mark.parametrize("environment, flags", [
    ({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}, []),
    ({}, ["--workers", "2"]),
    ({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}, FITTED),
])
@pytest.mark.slow
def test_a_run_writes_the_same_bytes_whatever_the_threads_and_workers(environment, flags, tmp_path):
    """Fresh processes: one BLAS thread (the reference), more BLAS threads, two worker processes;
    least-squares scales with float zero points too."""
    model = tmp_path / "m.onnx"
    onnx.save(mlp_model(widths=(96, 160, 64, 10), seed=1), model)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((512, 96)).astype(np.float32))

    def run(name: str, env: dict[str, str], extra: list[str]) -> bytes:
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "onnx_qubo", str(model), str(out), "--bits", "3", "--calib",
                        str(tmp_path / "calib.npz"), "--no-speed", "--quiet", *extra],
                       check=True, capture_output=True, env={**os.environ, **env},
                       cwd=Path(__file__).resolve().parents[1])
        return out.read_bytes()

    scheme = FITTED if flags == FITTED else []
    reference = run("one-thread.onnx", {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}, scheme)
    assert run("other.onnx", environment, flags) == reference
