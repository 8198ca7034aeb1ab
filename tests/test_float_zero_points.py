"""Float zero points (``--float-zero-points``) and least-squares scales (``--scale fit``).

The fit is the exact least-squares optimum of the layer's cost for fixed codes; a float
zero-point grid covers a group's own range (zero need not be on it); the written file computes
what numpy computes from the integers, scales and offsets read back from it, at onnxruntime's
default and basic levels; the reported cost is the output error measured in onnxruntime; the
forms that cannot write float zero points keep integer ones, and MatMulNBits takes them only
when asked to be slow (onnxruntime has no prepacked kernel for them).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from runs import quantize
from test_conv import conv_model
from test_half_precision import X as HALF_X
from test_half_precision import half_model
from test_ort_forms import Fresh, activations, relative_errors
from test_schemes import measured_error

from onnx_qubo import layer as layer_module
from onnx_qubo.backends.ort import OrtForm, matmul_nbits, reference
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.errors import OptionError
from onnx_qubo.core.grid import Granularity, GroupScales, Scheme, WeightCodes
from onnx_qubo.model.discovery import find_dense_layers
from onnx_qubo.plan import make_plan
from onnx_qubo.rounding.scales import GroupRanges, fitted_scales

from graphs import gemm_model, matmul_model

LEVELS = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)


def layer_cost(weight, scales, codes, gram, cross, scheme) -> float:
    d = weight - WeightCodes(codes, scales, scheme).dequantize()
    return float(np.einsum("if,if->", d @ gram, d) + 2 * np.einsum("if,if->", d, cross))


@pytest.mark.parametrize("float_zero_point", [False, True])
def test_fitted_scales_are_the_least_squares_optimum_for_the_codes(float_zero_point):
    rng = np.random.default_rng(0)
    n, f = 6, 10
    x = rng.standard_normal((200, f)) @ (np.eye(f) + 0.5 * rng.standard_normal((f, f)))
    gram, cross = x.T @ x / len(x), 0.1 * rng.standard_normal((n, f))
    weight = rng.standard_normal((n, f))
    scheme = Scheme(3, Granularity.CHANNEL, symmetric=False, float_zero_point=float_zero_point)
    ranges = GroupRanges(weight, scheme)
    start = ranges.scales(np.full(ranges.shape, 0.8))
    codes = scheme.grid.round_nearest(weight / start.scale + start.zero_point).astype(np.int64)
    fitted = fitted_scales(weight, codes, start, scheme, gram, cross)
    best = layer_cost(weight, fitted, codes, gram, cross, scheme)
    assert best < layer_cost(weight, start, codes, gram, cross, scheme)
    if not float_zero_point:
        np.testing.assert_array_equal(fitted.zero_point, start.zero_point)
    fitted_parameters = ("scale", "zero_point") if float_zero_point else ("scale",)  # integer zero points are kept
    for moved in fitted_parameters:  # any move of one row's fitted parameters costs more
        for step in (1e-3, -1e-3):
            values = {"scale": fitted.scale.copy(), "zero_point": fitted.zero_point.astype(np.float64)}
            values[moved][2] += step
            nudged = GroupScales(values["scale"], values["zero_point"], fitted.width)
            assert layer_cost(weight, nudged, codes, gram, cross, replace_float(scheme)) > best


def replace_float(scheme: Scheme) -> Scheme:
    """The grid whose zero points may be any number (to price a nudged integer zero point)."""
    return Scheme(scheme.bits, scheme.granularity, scheme.block_size, False, scheme.scale_type, True)


def test_a_float_zero_point_grid_spans_the_group_s_own_range():
    weight = np.array([[0.5, 0.9, 1.3, 2.0, -0.1, 0.4]])  # the first block (of 3) all positive
    scheme = Scheme(2, Granularity.BLOCK, 3, symmetric=False, float_zero_point=True)
    ranges = GroupRanges(weight, scheme)
    scales = ranges.scales(np.ones(ranges.shape))
    codes = scheme.grid.round_nearest(weight / scales.per_column(scales.scale, 6)
                                      + scales.per_column(scales.zero_point, 6)).astype(np.int64)
    dequantized = WeightCodes(codes, scales, scheme).dequantize()
    for block in (slice(0, 3), slice(3, 6)):  # each block's minimum and maximum are exact
        for pick in (np.argmin, np.argmax):
            j = block.start + pick(weight[0, block])
            assert dequantized[0, j] == pytest.approx(weight[0, j])
    integer = GroupRanges(weight, Scheme(2, Granularity.BLOCK, 3, symmetric=False))
    assert integer.lo[0, 0] == 0.0 and ranges.lo[0, 0] == 0.5  # the integer grid keeps 0 on it


def read_back(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def run(path, x, level) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("scheme", [dict(granularity="block", block_size=5), dict(granularity="channel"),
                                    dict(granularity="tensor")])
@pytest.mark.parametrize("scale", ["mse", "fit"])
def test_the_written_gemm_is_numpy_on_what_the_file_holds(scheme, scale, tmp_path):
    model = gemm_model(f=12, n=7, trans_b=0, alpha=-0.7, relu=False)
    x = (np.random.default_rng(0).standard_normal((300, 12)) + 0.3).astype(np.float32)
    out = tmp_path / "q.onnx"
    report = quantize(model, out, bits=3, symmetric=False, float_zero_points=True, scale=scale,
                      calibration={"x": x}, **scheme)
    assert report.evaluation.default_matches_basic
    assert [layer.storage for layer in report.layers] == ["UINT4"]
    cost = sum(layer.final_cost for layer in report.layers)
    assert cost == pytest.approx(measured_error(model, out, x), rel=1e-3)
    written = onnx.load(str(out))
    dq = next(n for n in written.graph.node if n.op_type == "DequantizeLinear")
    assert len(dq.input) == 2  # no integer zero point: the offsets are subtracted on the activation's side
    gemm = next(n for n in written.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] == dq.output[0]  # DequantizeLinear -> Gemm, which onnxruntime keeps quantized
    inits = read_back(out)
    codes, scale_values = inits[dq.input[0]].astype(np.float64), inits[dq.input[1]].astype(np.float64)
    offsets = next(v for k, v in inits.items() if k.endswith("_offsets")).astype(np.float64)  # [groups, n]
    xs = x.astype(np.float64)
    if scale_values.ndim == 2:  # blocks of 5 along the 12 inputs: the last one short
        scale_values = np.repeat(scale_values, 5, axis=1)[:, :12]
        sums = np.add.reduceat(xs, np.arange(0, 12, 5), axis=1)  # [N, 3]
    else:
        scale_values = scale_values.reshape(-1, 1) if scale_values.ndim else scale_values
        sums = xs.sum(axis=1, keepdims=True)
    bias = inits[gemm.input[2]].astype(np.float64) if len(gemm.input) > 2 else 0.0
    expected = -0.7 * xs @ (codes * scale_values).T + bias - sums @ offsets
    for level in LEVELS:
        got = run(out, x, level)
        assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()


def test_matmul_on_n_d_inputs_with_float_zero_points(tmp_path):
    model = matmul_model(f=40, n=9, leading=(3,))
    x = np.random.default_rng(1).standard_normal((50, 3, 40)).astype(np.float32)
    out = tmp_path / "q.onnx"
    report = quantize(model, out, bits=2, head_bits=2, symmetric=False, float_zero_points=True, scale="fit",
                      granularity="block", block_size=16, calibration={"x": x})
    assert report.evaluation.default_matches_basic
    cost = sum(layer.final_cost for layer in report.layers)
    assert cost == pytest.approx(measured_error(model, out, x), rel=1e-3)


def test_half_precision_float_zero_points_run_as_the_reference(tmp_path):
    out = tmp_path / "q.onnx"
    quantize(half_model("matmul"), out, calibration={"x": HALF_X}, bits=3, granularity="block", block_size=16,
             symmetric=False, float_zero_points=True, speed=False)
    offsets = [v for k, v in read_back(out).items() if k.endswith("_offsets")]
    assert len(offsets) == 2 and all(v.dtype == np.float16 for v in offsets)
    unoptimized = run(out, HALF_X, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).astype(np.float32)
    for level in LEVELS:
        got = run(out, HALF_X, level).astype(np.float32)
        assert np.linalg.norm(got - unoptimized) < 1e-3 * np.linalg.norm(unoptimized)


def test_scale_fit_never_costs_more_than_mse(tmp_path):
    model = gemm_model(f=24, n=16, relu=False, seed=3)
    x = (np.random.default_rng(2).standard_normal((400, 24)) @ np.random.default_rng(3).standard_normal((24, 24))
         ).astype(np.float32)
    costs = {}
    for scale in ("mse", "fit"):
        for float_zero_points in (False, True):
            report = quantize(model, tmp_path / f"{scale}{float_zero_points}.onnx", bits=3, symmetric=False,
                              float_zero_points=float_zero_points, scale=scale, granularity="block",
                              block_size=8, bias_correction=False, calibration={"x": x}, speed=False)
            costs[scale, float_zero_points] = report.layers[0].cost_solved
    for float_zero_points in (False, True):
        assert costs["fit", float_zero_points] <= costs["mse", float_zero_points] * (1 + 1e-9)
    assert costs["fit", True] < costs["mse", False]


def test_matmul_nbits_float_zero_points_are_correct_but_refused():
    rng = np.random.default_rng(4)
    n, f = 37, 70
    scheme = Scheme(4, Granularity.BLOCK, 32, symmetric=False, float_zero_point=True)
    scales = GroupScales(rng.uniform(0.01, 0.1, (n, 3)).astype(np.float32).astype(np.float64),
                         rng.uniform(-3, 18, (n, 3)).astype(np.float32).astype(np.float64), 32)
    codes = WeightCodes(rng.integers(0, 16, (n, f)), scales, scheme)
    bias = rng.normal(size=n).astype(np.float32)
    refusal = matmul_nbits(codes, bias, "x", "y", Fresh())
    assert isinstance(refusal, str) and "float zero points" in refusal
    form = matmul_nbits(codes, bias, "x", "y", Fresh(), allow_slow=True)
    assert isinstance(form, OrtForm)
    x = activations(rng, 3, f)
    assert max(relative_errors(form, reference(codes, x, bias=bias), x)) < 1e-5


def test_format_ort_keeps_float_zero_points_portable(tmp_path):
    model = matmul_model(f=64, n=8)
    x = np.random.default_rng(5).standard_normal((64, 64)).astype(np.float32)
    out = tmp_path / "q.onnx"
    report = quantize(model, out, bits=4, symmetric=False, float_zero_points=True, granularity="block",
                      block_size=32, format="ort", calibration={"x": x}, speed=False)
    assert report.evaluation.default_matches_basic
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulNBits" not in ops and {"DequantizeLinear", "Gemm", "ReduceSum", "Sub"} <= ops


def test_float_zero_points_are_refused_where_they_cannot_be_written():
    with pytest.raises(OptionError, match="float_zero_points"):
        QuantizeConfig.from_flat(float_zero_points=True, symmetric=True)
    with pytest.raises(OptionError, match="weight-only"):
        QuantizeConfig.from_flat(float_zero_points=True, activations="uint8")
    config = QuantizeConfig.from_flat(float_zero_points=True, bits=3)
    assert QuantizeConfig.from_json(config.to_json()) == config
    assert "float zero points" in config.describe()


def test_conv_layers_keep_integer_zero_points():
    layers = find_dense_layers(conv_model())[0] + find_dense_layers(gemm_model())[0]
    plan = make_plan(QuantizeConfig.from_flat(float_zero_points=True, symmetric=False, bits=4), layers)
    kinds = {p.layer.form.op_type: p.scheme.float_zero_point for p in plan.layers}
    assert kinds == {"Conv": False, "Gemm": True}


def test_scale_fit_rounds_small_conv_groups_as_the_run_does(tmp_path, monkeypatch):
    """A depthwise Conv's groups are solved to their proven optimum by the run (layer.fast_rounding);
    the fit's solves are the same ones, so what it keeps is what the run would write, and its cost
    is at most the default's."""
    model = conv_model(channels=(4, 8), group=4, pads=[1, 1, 1, 1])
    x = np.random.default_rng(6).standard_normal((40, 4, 9, 8)).astype(np.float32)
    optima = []
    exact = layer_module.optimal_rounding
    monkeypatch.setattr(layer_module, "optimal_rounding", lambda *a: optima.append(1) or exact(*a))
    costs = {}
    for scale in ("mse", "fit"):
        optima.clear()
        report = quantize(model, tmp_path / f"{scale}.onnx", bits=3, scale=scale, bias_correction=False,
                          calibration={"x": x}, speed=False)
        costs[scale] = sum(layer.cost_solved for layer in report.layers)
        assert len(optima) == 4 * (1 + layer_module.FIT_ROUNDS if scale == "fit" else 1)  # per group
    assert costs["fit"] <= costs["mse"] * (1 + 1e-9)
