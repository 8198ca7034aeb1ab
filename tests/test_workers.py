"""Layers split into row tasks, solved in this process, on worker processes and on Ray: the
same bits as one solve of the whole layer."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from runs import quantize

from onnx_qubo.core.errors import OptionError
from onnx_qubo.core.grid import IntegerGrid
from onnx_qubo.rounding.qubo import build_problem
from onnx_qubo.rounding.solvers import FastSolver, NealSolver
from onnx_qubo.rounding.workers import SolveTask, rows_of, solve_layer, solve_many, split_layer

from graphs import mlp_model

# 4 chunks of 32 neurons, wide enough for one replica, small enough for tabu rounds
FAST = {"chunk_bytes": 32 * 64 * 160}


def layer(n: int, f: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * f, f)) @ rng.standard_normal((f, f))
    gram = x.T @ x / len(x)
    w = rng.standard_normal((n, f))
    scale = np.abs(w).max(axis=1, keepdims=True) / 2.0
    return build_problem(w, scale, 0, 1.0, IntegerGrid(2), gram)


def test_fast_plan_has_chunks_and_tabu():
    plan = FastSolver(**FAST).plan(128, 160)
    assert plan.replicas == 1 and len(plan.chunks) == 4 and plan.tabu_steps >= 16


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.slow
def test_fast_split_equals_whole(parts):
    problem = layer(128, 160)
    whole = FastSolver(**FAST).solve(problem, seed=3)
    tasks = split_layer(problem, "fast", 3, parts, FAST)
    assert len(tasks) == parts
    assert np.array_equal(np.concatenate(solve_many(tasks)), whole)


@pytest.mark.slow
def test_fast_chunk_seeds_matter():
    """The split is only exact because each run keeps its chunks' random streams."""
    problem = layer(128, 160)
    task = split_layer(problem, "fast", 3, 2, FAST)[1]
    assert task.first_chunk == 2
    shifted = FastSolver(**FAST).solve_part(task.problem, 3, task.layer_rows, 0)
    assert not np.array_equal(shifted, task.run())


@pytest.mark.slow
def test_fast_result_does_not_depend_on_threads():
    problem = layer(128, 160)
    assert np.array_equal(FastSolver(workers=1).solve(problem, 1), FastSolver(workers=3).solve(problem, 1))


def test_wide_layer_blocks_and_inverse_give_the_same_bits():
    """Descent blocks of a few rows, and the blocked triangular inverse past its leaf size."""
    problem = layer(48, 300)
    from onnx_qubo.rounding.solvers import fast

    lower = np.linalg.cholesky(problem.gram[::-1, ::-1] + np.eye(300))
    assert np.allclose(fast.lower_inverse(lower, leaf=64) @ lower, np.eye(300), atol=1e-9)
    whole = FastSolver(tabu_work=0).solve(problem, 0)
    saved = fast.DESCENT_ELEMENTS
    fast.DESCENT_ELEMENTS = 300 * 5
    try:
        assert np.array_equal(FastSolver(tabu_work=0).solve(problem, 0), whole)
    finally:
        fast.DESCENT_ELEMENTS = saved


@pytest.mark.slow
def test_two_processes_equal_one():
    problem = layer(128, 160)
    whole = FastSolver(**FAST).solve(problem, seed=5)
    assert np.array_equal(solve_layer(problem, "fast", 5, workers=2, params=FAST), whole)


@pytest.mark.slow
def test_the_search_effort_reaches_the_worker_processes():
    """--effort is the solver's: a layer split over processes is searched as long as in one."""
    problem = layer(128, 160)
    whole = FastSolver(effort=2, **FAST).solve(problem, seed=5)
    assert FastSolver(effort=2).params == {"effort": 2} and FastSolver().params == {}
    assert np.array_equal(solve_layer(problem, "fast", 5, workers=2, params={**FAST, "effort": 2}), whole)
    assert not np.array_equal(FastSolver(**FAST).solve(problem, seed=5), whole)


def test_more_search_effort_finds_lower_costs():
    """Longer tabu rounds, more restarts and patience (--effort): on a layer whose default search
    stops short of its best roundings (mid-size layers of the OCR recognizer gained 3-25%:
    docs/results.md), the costs go down."""
    problem = layer(48, 96, seed=1)
    costs = [problem.energy(FastSolver(effort=effort).solve(problem, 0)) for effort in (1, 4)]
    assert costs[1] < costs[0]


@pytest.mark.slow
def test_a_run_with_effort_writes_the_same_bits_on_two_workers(tmp_path):
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    paths = [tmp_path / f"w{workers}.onnx" for workers in (1, 2)]
    for workers, path in zip((1, 2), paths):
        report = quantize(mlp_model(widths=(16, 64, 8)), path, bits=2, calibration={"x": x}, effort=3,
                          workers=workers, speed=False)
        assert "solver=fast (effort 3)" in report.to_text()
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_neal_rows_keep_their_seeds():
    problem = layer(6, 12)
    params = {"num_reads": 2, "num_sweeps": 50}
    whole = NealSolver(**params).solve(problem, 7)
    tasks = split_layer(problem, "neal", 7, 3, params)
    assert [t.rows.start for t in tasks] == [0, 2, 4]
    assert np.array_equal(np.concatenate(solve_many(tasks)), whole)


def test_rows_of_keeps_per_variable_steps():
    problem = layer(8, 10)
    wide = type(problem)(problem.gram, np.broadcast_to(problem.step, (8, 10)) * np.arange(1, 11),
                         problem.rounding, problem.cross, problem.offset)
    part = rows_of(wide, slice(2, 5))
    choice = np.ones((8, 10), dtype=bool)
    assert np.allclose(part.neuron_energies(choice[2:5]), wide.neuron_energies(choice)[2:5])


def test_exact_is_one_task():
    assert len(split_layer(layer(8, 10), "exact", 0, 4)) == 1


def test_bad_options():
    with pytest.raises(OptionError, match="unknown solver"):
        split_layer(layer(4, 6), "annealer", 0, 2)
    with pytest.raises(OptionError, match="workers"):
        solve_many([], workers=0)


def test_ray_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(OptionError, match="pip install"):
        solve_many(split_layer(layer(4, 6), "rtn", 0, 1), ray_address="local")


def test_ray_unreachable():
    with pytest.raises(OptionError, match="ray_address '127.0.0.1:1': cannot reach the Ray cluster"):
        solve_many(split_layer(layer(4, 6), "rtn", 0, 1), ray_address="127.0.0.1:1")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_local_equals_whole():
    ray = pytest.importorskip("ray")
    problem = layer(128, 160)
    whole = FastSolver(**FAST).solve(problem, seed=2)
    try:
        assert np.array_equal(solve_layer(problem, "fast", 2, ray_address="local", params=FAST, parts=3), whole)
    finally:
        ray.shutdown()


def test_task_is_what_a_solve_needs():
    problem = layer(8, 10)
    task = SolveTask(problem, "rtn", 0, slice(0, 8), 8)
    assert np.array_equal(task.run(), problem.rounding.free & (problem.rounding.frac >= 0.5))


def quantized_bytes(path, **distribution):
    model = mlp_model(widths=(40, 70, 12))
    x = np.random.default_rng(0).standard_normal((200, 40)).astype(np.float32)
    quantize(model, path, bits=2, calibration={"x": x}, speed=False, **distribution)
    return path.read_bytes()


@pytest.mark.slow
def test_quantize_writes_the_same_model_with_one_or_two_worker_processes(tmp_path):
    assert quantized_bytes(tmp_path / "w1.onnx") == quantized_bytes(tmp_path / "w2.onnx", workers=2)


@pytest.mark.ray
@pytest.mark.slow
def test_quantize_on_a_local_ray_cluster_writes_the_same_model_and_shuts_it_down(tmp_path):
    ray = pytest.importorskip("ray")
    try:
        assert quantized_bytes(tmp_path / "w1.onnx") == quantized_bytes(tmp_path / "ray.onnx", workers=2,
                                                                        ray_address="local")
        assert not ray.is_initialized()  # the cluster quantize started ended with it
    finally:
        ray.shutdown()
