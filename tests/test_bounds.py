import numpy as np
import pytest

from onnx_qubo.core.progress import Progress
from onnx_qubo.rounding.bounds import lower_bounds
from onnx_qubo.rounding.solvers import ExactSolver

from problems import channel_problem, max_abs_scale, random_problem


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.slow
def test_bound_never_exceeds_the_proven_optimum(general):
    for seed in range(5):
        problem = random_problem(n=10, f=12, clip=0.6, seed=seed, general=general)
        optimum = problem.neuron_energies(ExactSolver().solve(problem, 0, Progress()))
        bound = lower_bounds(problem)
        assert (bound >= 0).all()
        assert (bound <= optimum * (1 + 1e-9) + 1e-12).all()


def test_bound_is_tight_for_uncorrelated_inputs():
    # With G = I the relaxation is separable: free weights cost nothing, clamped ones u_j^2.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 9))
    problem = channel_problem(w, max_abs_scale(w, 2) * 0.5, 2, np.eye(9))
    fixed = ~problem.rounding.free
    expected = (np.where(fixed, problem.rounding.frac, 0.0) ** 2).sum(axis=1) * problem.step[:, 0] ** 2
    np.testing.assert_allclose(lower_bounds(problem), expected, rtol=1e-6, atol=1e-12)
    assert fixed.any()
