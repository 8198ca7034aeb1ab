import itertools
from dataclasses import replace

import numpy as np
import pytest

from onnx_qubo.core.errors import SolverLimitError
from onnx_qubo.core.progress import Progress
from onnx_qubo.rounding.solvers import ExactSolver, FastSolver, NealSolver, RoundToNearest
from onnx_qubo.rounding.solvers.exact import minimize_binary_quadratic
from onnx_qubo.rounding.solvers.fast import feedback_factor

from oracles import brute_force_minimum
from problems import random_problem


def brute_force_energies(problem, i):
    """Every rounding of neuron i scored by the layer energy (not by the neuron QUBO)."""
    free = np.flatnonzero(problem.rounding.free[i])
    best = np.inf
    for bits in itertools.product([False, True], repeat=len(free)):
        choice = np.zeros(problem.shape, dtype=bool)
        choice[i, free] = bits
        best = min(best, problem.neuron_energies(choice)[i])
    return best


@pytest.mark.parametrize("general", [False, True])
def test_exact_finds_the_brute_force_optimum(general):
    problem = random_problem(n=4, f=8, general=general)
    choice = ExactSolver().solve(problem, 0, Progress())
    energies = problem.neuron_energies(choice)
    for i in range(4):
        assert energies[i] == pytest.approx(brute_force_energies(problem, i), rel=1e-12)


@pytest.mark.parametrize("rank", [14, 5])  # full rank, and a singular (PSD) matrix
@pytest.mark.slow
def test_branch_and_bound_matches_enumeration_from_any_start(rank):
    rng = np.random.default_rng(rank)
    for _ in range(6):
        x = rng.standard_normal((rank, 14))
        quadratic = x.T @ x
        linear = rng.standard_normal(14) * 3 - np.diag(quadratic)
        start = rng.random(14) < 0.5
        v = minimize_binary_quadratic(quadratic, linear, start, chunk=16)
        value = v @ quadratic @ v + linear @ v
        assert value == pytest.approx(brute_force_minimum(quadratic, linear), rel=1e-9, abs=1e-9)


def test_exact_refuses_too_many_free_variables():
    with pytest.raises(SolverLimitError, match="at most 5 free weights"):
        ExactSolver(max_free=5).solve(random_problem(f=10, clip=1.0), 0, Progress())


def test_rtn_rounds_to_nearest_on_free_weights():
    problem = random_problem()
    choice = RoundToNearest().solve(problem, 0, Progress())
    integers = problem.integers(choice)
    scaled = problem.rounding.base + problem.rounding.frac
    free = problem.rounding.free
    np.testing.assert_array_equal(integers[free], np.floor(scaled[free] + 0.5))


@pytest.mark.slow
def test_neal_is_deterministic_and_never_below_the_optimum():
    problem = random_problem(n=12, f=12, seed=3)
    exact = problem.neuron_energies(ExactSolver().solve(problem, 0, Progress()))
    first = NealSolver().solve(problem, 7, Progress())
    np.testing.assert_array_equal(first, NealSolver().solve(problem, 7, Progress()))
    assert (problem.neuron_energies(first) >= exact - 1e-9).all()


@pytest.mark.slow
def test_neal_with_more_reads_finds_the_optimum_on_small_neurons():
    # With neal's default single read it often stops in a local minimum of these correlated
    # problems (the paper's weakness); twenty reads should find the optimum nearly always.
    problem = random_problem(n=12, f=12, seed=3)
    exact = problem.neuron_energies(ExactSolver().solve(problem, 0, Progress()))
    neal = problem.neuron_energies(NealSolver(num_reads=20).solve(problem, 7, Progress()))
    assert np.isclose(neal, exact, rtol=1e-9).mean() >= 0.9


def test_solvers_never_choose_fixed_weights():
    problem = random_problem(clip=0.4)
    for solver in (RoundToNearest(), NealSolver(num_sweeps=50), ExactSolver()):
        choice = solver.solve(problem, 0, Progress())
        integers = problem.integers(choice)
        assert integers.min() >= -2 and integers.max() <= 1


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.slow
def test_fast_finds_the_proven_optimum_on_small_neurons(general):
    found = total = 0
    for seed in range(10):
        problem = random_problem(n=20, f=16, clip=0.8, seed=seed, general=general)
        exact = problem.neuron_energies(ExactSolver().solve(problem, 0, Progress()))
        fast = problem.neuron_energies(FastSolver().solve(problem, 0, Progress()))
        assert (fast >= exact * (1 - 1e-9)).all()
        found += np.isclose(fast, exact, rtol=1e-9, atol=1e-12).sum()
        total += len(exact)
    assert found / total >= 0.99


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.slow
def test_fast_is_deterministic_and_never_worse_than_rtn_per_neuron(general):
    problem = random_problem(n=40, f=50, clip=0.6, seed=5, general=general)
    first = FastSolver().solve(problem, 3, Progress())
    np.testing.assert_array_equal(first, FastSolver().solve(problem, 3, Progress()))
    rtn = problem.neuron_energies(RoundToNearest().solve(problem))
    assert (problem.neuron_energies(first) <= rtn * (1 + 1e-12)).all()


@pytest.mark.slow
def test_fast_in_small_memory_chunks_still_improves_on_rtn():
    problem = random_problem(n=40, f=50, clip=0.6, seed=6)
    chunked = FastSolver(chunk_bytes=8 * 50 * 8 * 3).solve(problem, 0, Progress())  # 3 neurons a chunk
    rtn = problem.neuron_energies(RoundToNearest().solve(problem))
    assert (problem.neuron_energies(chunked) <= rtn * (1 + 1e-12)).all()
    assert problem.energy(chunked) < 0.9 * rtn.sum()


def test_feedback_factor_is_the_upper_cholesky_factor_of_the_damped_inverse_gram():
    a = np.random.default_rng(0).standard_normal((50, 30))
    a[:, 3] = 0  # a dead input: G is singular without damping
    gram = a.T @ a / 50
    upper = feedback_factor(gram)
    damped = gram + 0.01 * np.mean(np.diag(gram)) * np.eye(30)
    np.testing.assert_allclose(upper, np.triu(upper))
    np.testing.assert_allclose(upper.T @ upper, np.linalg.inv(damped), atol=1e-9)


def reference_sequential(problem, upper):
    """GPTQ restricted to floor/ceil, one variable at a time, every error fed forward at once."""
    target = problem.step * problem.rounding.frac
    step = np.broadcast_to(problem.step, target.shape)
    v = np.zeros(target.shape, dtype=bool)
    for col in range(target.shape[1]):
        v[:, col] = problem.rounding.free[:, col] & (target[:, col] / step[:, col] >= 0.5)
        error = (target[:, col] - step[:, col] * v[:, col]) / upper[col, col]
        target[:, col + 1:] -= np.outer(error, upper[col, col + 1:])
    return v


@pytest.mark.parametrize("general", [False, True])
def test_sequential_start_in_lazy_batches_equals_one_variable_at_a_time(general):
    from onnx_qubo.rounding.solvers import fast

    problem = random_problem(n=9, f=75, clip=0.7, seed=4, general=general)
    problem = replace(problem, cross=np.zeros_like(problem.cross))  # the start's target is then step * frac
    upper = feedback_factor(problem.gram)
    n, f = problem.shape
    terms = fast._Terms(problem.gram, problem.gram.astype(np.float32), np.broadcast_to(problem.step, (n, f)),
                        problem.rounding.frac, problem.rounding.free, problem.cross)
    expected = reference_sequential(problem, upper)
    # blocks of 32 in runs of 8 (and a short last block, and a short last run)
    np.testing.assert_array_equal(fast.sequential_start(terms, upper, block=32, inner=8), expected)


@pytest.mark.parametrize("general", [False, True])
def test_fast_ends_in_an_exact_local_minimum_whatever_its_float32_stage_did(general, monkeypatch):
    """The float64 stage finishes what the float32 one leaves: no single flip lowers any neuron's
    exact energy, even when the float32 stage's tolerance lets it make no move at all, or when it
    takes every move for a gain (as rounding noise did on all-zero neurons of PP-OCRv4's 1x1
    Convs) and only its step limit stops it."""
    from onnx_qubo.rounding.solvers import fast

    problem = random_problem(n=12, f=40, clip=0.7, seed=8, general=general)
    for tolerance, floor in ((fast.ROUGH_TOLERANCE, fast.ROUGH_FLOOR), (1e6, fast.ROUGH_FLOOR), (-1e6, -1e9)):
        monkeypatch.setattr(fast, "ROUGH_TOLERANCE", tolerance)
        monkeypatch.setattr(fast, "ROUGH_FLOOR", floor)
        choice = FastSolver(tabu_work=0).solve(problem, 0, Progress())
        energies = problem.neuron_energies(choice)
        for j in range(problem.shape[1]):
            flipped = choice.copy()
            flipped[:, j] ^= True
            lower = problem.neuron_energies(flipped) < energies - 1e-9 * np.abs(energies)
            assert not (lower & problem.rounding.free[:, j]).any(), (tolerance, j)
