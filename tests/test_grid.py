import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.core.grid import (
    Granularity,
    GroupScales,
    InputQuantizer,
    IntegerGrid,
    Scheme,
    WeightCodes,
    split_rounding,
)
from onnx_qubo.rounding.scales import GroupRanges, choose_scales

from problems import channel_problem, max_abs_scale


@pytest.mark.parametrize("bits,signed,qmin,qmax,storage", [
    (1, True, -1, 0, TensorProto.INT2), (2, True, -2, 1, TensorProto.INT2), (3, True, -4, 3, TensorProto.INT4),
    (4, True, -8, 7, TensorProto.INT4), (5, True, -16, 15, TensorProto.INT8), (8, True, -128, 127, TensorProto.INT8),
    (2, False, 0, 3, TensorProto.UINT2), (4, False, 0, 15, TensorProto.UINT4), (8, False, 0, 255, TensorProto.UINT8)])
def test_grid_ranges_and_storage(bits, signed, qmin, qmax, storage):
    grid = IntegerGrid(bits, signed)
    assert (grid.qmin, grid.qmax, grid.storage[0]) == (qmin, qmax, storage)


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="between 1 and 8"):
        IntegerGrid(bits)


def test_scheme_validates_granularity_and_block_size():
    assert Scheme(4, "block", 32).opset == 21 and Scheme(8, "channel").opset == 13 and Scheme(2).opset == 25
    for bad in (dict(granularity="row"), dict(granularity="block"), dict(granularity="channel", block_size=8)):
        with pytest.raises(ValueError):
            Scheme(4, **bad)


def test_max_abs_scale_maps_largest_magnitude_to_qmax():
    w = np.array([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(max_abs_scale(w, 4), [2.0 / 7, 1.0])


def test_asymmetric_ranges_span_min_to_max_with_zero_exact():
    w = np.array([[0.5, 2.0, 1.0], [-3.0, -1.0, -0.5]])
    scales = GroupRanges(w, Scheme(2, symmetric=False)).scales(np.ones((2, 1)))
    np.testing.assert_allclose(scales.scale[:, 0], [2.0 / 3, 1.0])  # [0, 2] and [-3, 0] over 3 steps
    np.testing.assert_array_equal(scales.zero_point[:, 0], [0, 3])
    codes = WeightCodes(np.array([[0, 3, 0], [0, 3, 3]]), scales, Scheme(2, symmetric=False))
    np.testing.assert_allclose(codes.dequantize(), [[0, 2, 0], [-3, 0, 0]])


@pytest.mark.parametrize("granularity,block,groups", [("tensor", 0, 1), ("channel", 0, 1), ("block", 4, 3)])
def test_scale_groups_cover_their_inputs(granularity, block, groups):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 10))
    scales = choose_scales("minmax", w, Scheme(4, granularity, block), np.eye(10))
    assert scales.scale.shape == (3, groups)
    per_column = np.broadcast_to(scales.per_column(scales.scale, 10), (3, 10))
    if granularity == "tensor":
        assert np.all(per_column == np.abs(w).max() / 7)
    if granularity == "block":  # the last block holds columns 8..9
        np.testing.assert_allclose(per_column[:, 8], np.abs(w[:, 8:]).max(axis=1) / 7)
    assert np.all(np.abs(w) <= per_column * 8)  # every weight within the grid's range


def test_mse_search_never_costs_more_than_minmax_under_round_to_nearest():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 40)) * np.r_[np.ones(39), 8.0]  # an outlier input column
    x = rng.standard_normal((500, 40))
    gram = x.T @ x / 500
    for scheme in (Scheme(2), Scheme(3, "block", 8, symmetric=False), Scheme(2, "tensor")):
        costs = {}
        for method in ("minmax", "mse"):
            scales = choose_scales(method, w, scheme, gram)
            grid = scheme.grid
            scaled = w / scales.per_column(scales.scale, 40) + scales.per_column(scales.zero_point, 40)
            delta = w - WeightCodes(grid.round_nearest(scaled).astype(np.int64), scales, scheme).dequantize()
            costs[method] = np.einsum("if,fg,ig->", delta, gram, delta)
        assert costs["mse"] <= costs["minmax"] * (1 + 1e-6)


def test_split_rounding_clamps_weights_whose_choice_leaves_the_grid():
    grid = IntegerGrid(2)  # {-2, -1, 0, 1}
    w = np.array([[-3.5, -2.5, -1.5, 0.3, 0.7, 1.0, 1.2, 5.0]])
    r = split_rounding(w, grid)
    np.testing.assert_array_equal(r.base, [[-2, -2, -2, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(r.free, [[False, False, True, True, True, False, False, False]])
    np.testing.assert_allclose(r.base + r.frac, w)  # the residual of clamped weights is kept
    assert (r.base + r.free <= grid.qmax).all() and (r.base >= grid.qmin).all()


def test_round_nearest_is_what_the_rtn_solver_chooses():
    from onnx_qubo.rounding.solvers import RoundToNearest

    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 40)) * 2
    scale = max_abs_scale(w, 3) * 0.5
    problem = channel_problem(w, scale, 3, np.eye(40))
    np.testing.assert_array_equal(problem.integers(RoundToNearest().solve(problem)),
                                  IntegerGrid(3).round_nearest(w / scale[:, None]))


@pytest.mark.parametrize("signed", [False, True])
def test_input_quantizer_matches_onnxruntime_quantize_dequantize(signed):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 16)) * 3 + 1).astype(np.float32)
    x[0, :4] = [0.0, 1e9, -1e9, 0.5]  # exact zero, saturation at both ends
    quantizer = InputQuantizer.for_range(float(np.percentile(x, 1)), float(np.percentile(x, 99)), signed)
    zero_type = np.int8 if signed else np.uint8
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 16])],
        [numpy_helper.from_array(np.array(quantizer.scale, np.float32), "s"),
         numpy_helper.from_array(np.array(quantizer.zero_point, zero_type), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(quantizer.fake_quantize(x), session.run(None, {"x": x})[0])
    assert quantizer.fake_quantize(np.zeros(1))[0] == 0.0


def test_weight_codes_dequantize_with_blocks():
    codes = WeightCodes(np.array([[1, 2, 3]]), GroupScales(np.array([[1.0, 2.0]]), np.array([[1, 0]]), width=2),
                        Scheme(3, Granularity.BLOCK, 2, symmetric=False))
    np.testing.assert_allclose(codes.dequantize(), [[0, 1, 6]])
    assert codes.block_size == 2 and codes.scale.shape == (1, 2) and codes.zero_point is not None


def test_weight_codes_with_one_scale_per_row_look_per_row_to_the_kernels():
    """A tensor's scale, or one block spanning the row, is one scale per row ([n]) to the kernel
    builders; the signed grid has no zero point."""
    scales = GroupScales(np.array([[0.5], [0.5]]), np.zeros((2, 1), np.int64), width=3)
    codes = WeightCodes(np.array([[1, -2, 0], [3, 0, -4]]), scales, Scheme(3, Granularity.TENSOR))
    assert codes.block_size == 0 and codes.scale.shape == (2,) and codes.zero_point is None
    np.testing.assert_allclose(codes.scaled(2.0).dequantize(), [[1, -2, 0], [3, 0, -4]])


@pytest.mark.parametrize("symmetric", [True, False])
def test_half_precision_scales_are_chosen_as_they_will_be_stored(symmetric):
    """A FLOAT16 scheme's scales are float16 values (the QUBO solves for the written model), kept
    above zero for tiny weights; a FLOAT scheme's stay as computed."""
    rng = np.random.default_rng(0)
    w = np.vstack([rng.standard_normal((3, 16)), np.full((1, 16), 1e-9)])
    half = Scheme(4, Granularity.BLOCK, 8, symmetric, TensorProto.FLOAT16)
    scales = GroupRanges(w, half).scales(np.full((4, 2), 0.9))
    assert np.array_equal(scales.scale, scales.scale.astype(np.float16).astype(np.float64))
    assert scales.scale.min() > 0 and half.scale_dtype is np.float16
    full = GroupRanges(w, Scheme(4, Granularity.BLOCK, 8, symmetric)).scales(np.full((4, 2), 0.9))
    assert not np.array_equal(full.scale, full.scale.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(scales.scale[:3], full.scale[:3], rtol=2 ** -11)
    with pytest.raises(ValueError, match="FLOAT or FLOAT16"):
        Scheme(4, scale_type=TensorProto.DOUBLE)
