import numpy as np
import pytest
from onnx import TensorProto

from onnx_qubo.grid import IntegerGrid, split_rounding


@pytest.mark.parametrize("bits,qmin,qmax,storage", [
    (1, -1, 0, TensorProto.INT2), (2, -2, 1, TensorProto.INT2), (3, -4, 3, TensorProto.INT4),
    (4, -8, 7, TensorProto.INT4), (5, -16, 15, TensorProto.INT8), (8, -128, 127, TensorProto.INT8)])
def test_grid_ranges_and_storage(bits, qmin, qmax, storage):
    grid = IntegerGrid(bits)
    assert (grid.qmin, grid.qmax, grid.storage[0]) == (qmin, qmax, storage)


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="between 1 and 8"):
        IntegerGrid(bits)


def test_max_abs_scale_maps_largest_magnitude_to_qmax():
    w = np.array([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0]])
    scale = IntegerGrid(4).max_abs_scale(w)
    np.testing.assert_allclose(scale, [2.0 / 7, 1.0])


def test_split_rounding_clamps_weights_whose_choice_leaves_the_grid():
    grid = IntegerGrid(2)  # {-2, -1, 0, 1}
    w = np.array([[-3.5, -2.5, -1.5, 0.3, 0.7, 1.0, 1.2, 5.0]])
    r = split_rounding(w, np.array([1.0]), grid)
    np.testing.assert_array_equal(r.base, [[-2, -2, -2, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(r.free, [[False, False, True, True, True, False, False, False]])
    np.testing.assert_allclose(r.base + r.frac, w)  # the residual of clamped weights is kept
    assert (r.base + r.free <= grid.qmax).all() and (r.base >= grid.qmin).all()


def test_round_nearest_is_what_the_rtn_solver_chooses():
    from onnx_qubo.qubo import build_problem
    from onnx_qubo.solvers import RoundToNearest

    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 40)) * 2
    grid = IntegerGrid(3)
    scale = grid.max_abs_scale(w) * 0.5
    problem = build_problem(w, 1.0, scale, grid, np.eye(40))
    np.testing.assert_array_equal(problem.integers(RoundToNearest().solve(problem)),
                                  grid.round_nearest(w / scale[:, None]))
