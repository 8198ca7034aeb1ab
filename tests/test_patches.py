"""Conv layers as dense layers over patches (onnx_qubo/calibration/patches.py), checked against
onnxruntime: the patches reproduce its Conv output, and the QUBO energy built from the streamed
patch Gram equals the squared Conv output error it measures (sum over channels, mean over
samples x output positions). Also: the lowered form DequantizeLinear -> Conv runs alike at every
optimization level, per channel and with blocks along the input-channel axis."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_qubo.calibration.patches import (
    PatchGram,
    flatten_weight,
    iter_patches,
    patches,
    unflatten_weight,
)
from onnx_qubo.core.grid import IntegerGrid
from onnx_qubo.core.views import ConvGeometry
from onnx_qubo.rounding.qubo import LayerProblem, build_problem

LEVELS = {"default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


@dataclass(frozen=True)
class Case:
    """One Conv: channels, groups, kernel, input spatial shape and the node's attributes."""

    c: int
    m: int
    group: int
    kernel: tuple[int, ...]
    spatial: tuple[int, ...]
    attrs: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"C{self.c}-M{self.m}-g{self.group}-k{self.kernel}-in{self.spatial}-{self.attrs}"


CASES = [
    Case(3, 5, 1, (3,), (11,)),  # 1-D
    Case(4, 4, 1, (5,), (17,), {"strides": [3], "pads": [0, 2]}),
    Case(2, 4, 2, (2,), (9,), {"strides": [2], "auto_pad": "SAME_UPPER"}),  # ORT: no dilation with SAME
    Case(1, 6, 1, (3, 3), (8, 8), {"pads": [1, 1, 1, 1]}),  # 2-D
    Case(4, 6, 2, (3, 2), (9, 8), {"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}),
    Case(3, 3, 3, (3, 4), (9, 8), {"auto_pad": "SAME_LOWER", "strides": [2, 3]}),  # depthwise
    Case(3, 6, 3, (3, 3), (9, 8), {"auto_pad": "SAME_UPPER", "strides": [2, 3]}),  # depthwise x2
    Case(4, 2, 1, (3, 3), (7, 9), {"auto_pad": "VALID", "strides": [3, 2], "dilations": [2, 1]}),
    Case(6, 4, 2, (1, 1), (5, 6)),  # pointwise, grouped
    Case(2, 4, 2, (2, 3, 2), (5, 6, 4), {"pads": [0, 1, 0, 1, 0, 2], "strides": [1, 2, 1]}),  # 3-D
    Case(3, 3, 3, (3, 3, 3), (6, 5, 5), {"pads": [1, 1, 1, 1, 1, 1], "strides": [2, 1, 2], "dilations": [1, 2, 1]}),
]


def conv_node(case: Case, weight: str, output: str, bias: str = "") -> onnx.NodeProto:
    return helper.make_node("Conv", ["x", weight] + ([bias] if bias else []), [output], group=case.group,
                            **case.attrs)


def geometry_of(case: Case) -> ConvGeometry:
    """Built as the quantizer will: from the node's attribute protos (strings come as bytes)."""
    node = conv_node(case, "W", "y")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return ConvGeometry.from_attributes(attrs, (case.m, case.c // case.group, *case.kernel), case.c)


def run_convs(case: Case, x: np.ndarray, weights: list[np.ndarray], bias: list[np.ndarray],
              x_other: np.ndarray | None = None, level: str = "disabled") -> list[np.ndarray]:
    """onnxruntime Conv of x with each (weight, bias); the last one reads x_other if given."""
    inits, nodes, outputs = [], [], []
    for k, (w, b) in enumerate(zip(weights, bias)):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"W{k}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{k}")]
        node = conv_node(case, f"W{k}", f"y{k}", f"b{k}")
        if x_other is not None and k == len(weights) - 1:
            node.input[0] = "x_other"
        nodes.append(node)
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(x.shape)) for n in
              (["x", "x_other"] if x_other is not None else ["x"])]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": x.astype(np.float32)} | ({"x_other": x_other.astype(np.float32)} if x_other is not None else {})
    return [y.astype(np.float64) for y in session(model, level).run(None, feed)]


def session(model: onnx.ModelProto, level: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def numpy_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """Conv through the patches: per group, patch rows times the group's flat weight rows."""
    p, flat = patches(x, geometry), flatten_weight(weight.astype(np.float64), geometry)
    y = np.concatenate([p[g] @ flat[geometry.rows_of(g)].T for g in range(geometry.groups)], axis=1) + bias
    return np.moveaxis(y.reshape(len(x), *geometry.output_shape(x.shape[2:]), geometry.out_channels), -1, 1)


def random_conv(case: Case, seed: int, batch: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, case.c, *case.spatial)) + 0.3).astype(np.float32)
    w = rng.standard_normal((case.m, case.c // case.group, *case.kernel)).astype(np.float32)
    return x, w, rng.standard_normal(case.m).astype(np.float32)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_patches_times_flat_weight_is_onnxruntime_conv(case):
    x, w, b = random_conv(case, seed=1)
    geometry = geometry_of(case)
    (expected,) = run_convs(case, x, [w], [b])
    np.testing.assert_allclose(numpy_conv(x, w, b, geometry), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_with_dilation_matches_the_onnx_reference(auto_pad):
    """onnxruntime refuses dilations with SAME padding; ONNX's reference evaluator computes it."""
    case = Case(2, 4, 2, (3, 2), (9, 8), {"auto_pad": auto_pad, "strides": [2, 1], "dilations": [2, 3]})
    x, w, b = (a.astype(np.float64) for a in random_conv(case, seed=4))
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph([conv_node(case, "W", "y", "b")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (expected,) = ReferenceEvaluator(model).run(None, {"x": x})
    np.testing.assert_allclose(numpy_conv(x, w, b, geometry_of(case)), expected, rtol=1e-12, atol=1e-12)


def group_problems(weight: np.ndarray, scale: np.ndarray, bits: int, gram: np.ndarray,
                   geometry: ConvGeometry, cross: np.ndarray | None = None,
                   offset: np.ndarray | None = None) -> list[LayerProblem]:
    """One LayerProblem per group (its channels share that group's Gram), built by the existing
    build_problem; ``weight`` [M, f'] flat (f' = f, or f + 1 with the bias as last column)."""
    return [build_problem(weight[rows], scale[rows, None], 0, 1.0, IntegerGrid(bits), gram[g],
                          None if cross is None else cross[rows], None if offset is None else offset[rows])
            for g in range(geometry.groups) for rows in [geometry.rows_of(g)]]


def clipped_scale(flat: np.ndarray, bits: int) -> np.ndarray:
    return np.abs(flat).max(axis=1) * 0.7 / (2 ** (bits - 1) - 1)


@pytest.mark.parametrize("case,bits,quantize_bias", [(c, 2 + k % 3, k % 2 == 1) for k, c in enumerate(CASES)],
                         ids=str)
def test_streamed_gram_energy_is_the_measured_conv_output_error(case, bits, quantize_bias):
    """sum over groups and channels of e^T G e == mean over (sample, output position) of the
    squared output error summed over channels, in onnxruntime; G streamed over 3 batches in
    chunks small enough to split samples and output lines."""
    rng = np.random.default_rng(bits)
    geometry = geometry_of(case)
    batches = [random_conv(case, seed)[0] for seed in range(3)]
    _, w, b = random_conv(case, seed=1)
    f = geometry.features
    accumulator = PatchGram(geometry, max_bytes=8 * f * geometry.groups * 7)  # 7 rows a chunk
    for x in batches:
        accumulator.update(x)
    stats = accumulator.result()
    x_all = np.concatenate(batches)
    assert stats.count == len(x_all) * int(np.prod(geometry.output_shape(case.spatial)))

    flat = flatten_weight(w.astype(np.float64), geometry)
    values = np.hstack([flat, b[:, None]]) if quantize_bias else flat
    gram = stats.gram if quantize_bias else stats.gram[:, :-1, :-1]  # z = [p; 1], or p alone
    scale = clipped_scale(values, bits)
    problems = group_problems(values, scale, bits, gram, geometry)
    for _ in range(2):
        choices = [rng.random(p.shape) < 0.5 for p in problems]
        dequantized = np.concatenate([p.integers(c) for p, c in zip(problems, choices)]) * scale[:, None]
        w_q = unflatten_weight(dequantized[:, :f], geometry)
        b_q = dequantized[:, f] if quantize_bias else b
        y_float, y_quant = run_convs(case, x_all, [w, w_q], [b, b_q])
        measured = ((y_float - y_quant) ** 2).sum(axis=1).mean()  # channels summed, positions averaged
        energy = sum(p.energy(c) for p, c in zip(problems, choices))
        np.testing.assert_allclose(energy, measured, rtol=1e-4)


@pytest.mark.parametrize("case,quantize_bias", [(CASES[4], False), (CASES[6], True), (CASES[9], True)], ids=str)
def test_cross_terms_make_the_energy_exact_when_the_layer_sees_other_inputs(case, quantize_bias):
    """The quantized Conv reads x~ (here x plus noise) and is compared with the float Conv on x:
    the cross and offset terms from E[z d^T], E[d d^T] account for the difference."""
    rng = np.random.default_rng(7)
    geometry = geometry_of(case)
    x, w, b = random_conv(case, seed=2, batch=4)
    seen = (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    accumulator = PatchGram(geometry, with_drift=True, max_bytes=8 * geometry.features * geometry.groups * 5)
    for half in (slice(0, 2), slice(2, 4)):
        accumulator.update(x[half], seen[half])
    stats = accumulator.result()
    assert stats.cross is not None and stats.drift is not None
    f = geometry.features
    flat = flatten_weight(w.astype(np.float64), geometry)
    groups = geometry.group_of()
    cross = np.einsum("mj,mfj->mf", flat, stats.cross[groups])  # E[z~ d^T] w_m, z~ = [p~; 1]
    offset = np.einsum("mj,mjk,mk->m", flat, stats.drift[groups], flat)
    values = np.hstack([flat, b[:, None]]) if quantize_bias else flat
    width = values.shape[1]
    scale = clipped_scale(values, 3)
    problems = group_problems(values, scale, 3, stats.gram[:, :width, :width], geometry, cross[:, :width], offset)
    choices = [rng.random(p.shape) < 0.5 for p in problems]
    dequantized = np.concatenate([p.integers(c) for p, c in zip(problems, choices)]) * scale[:, None]
    b_q = dequantized[:, f] if quantize_bias else b
    y_float, y_quant = run_convs(case, x, [w, unflatten_weight(dequantized[:, :f], geometry)], [b, b_q],
                                 x_other=seen)
    measured = ((y_float - y_quant) ** 2).sum(axis=1).mean()
    np.testing.assert_allclose(sum(p.energy(c) for p, c in zip(problems, choices)), measured, rtol=1e-4)
    # each group's statistics are a dense layer's InputStatistics
    assert np.array_equal(stats.group(1).cross, stats.cross[1])


def test_chunks_respect_the_memory_bound_and_concatenate_to_the_patches():
    case = CASES[4]
    geometry = geometry_of(case)
    x = random_conv(case, seed=3, batch=5)[0]
    whole = patches(x, geometry)
    line_bytes = 8 * geometry.groups * geometry.features * geometry.output_shape(case.spatial)[1]
    for budget in (whole.nbytes, whole.nbytes // 2, 2 * line_bytes, line_bytes, 1):
        blocks = list(iter_patches(x, geometry, budget))
        assert all(block.nbytes <= max(budget, line_bytes) for block in blocks)
        assert np.array_equal(np.concatenate(blocks, axis=1), whole)
    # a Gram from any chunking is the same
    grams = []
    for budget in (np.inf, line_bytes):
        acc = PatchGram(geometry, max_bytes=budget)
        acc.update(x)
        grams.append(acc.result().gram)
    np.testing.assert_allclose(grams[0], grams[1], rtol=1e-12)


def test_weight_layout_round_trip_and_errors():
    geometry = geometry_of(CASES[6])  # depthwise with multiplier 2: M=6, C=3, groups=3
    w = np.arange(6 * 1 * 3 * 3).reshape(6, 1, 3, 3)
    assert np.array_equal(unflatten_weight(flatten_weight(w, geometry), geometry), w)
    assert list(geometry.group_of()) == [0, 0, 1, 1, 2, 2] and geometry.rows_of(2) == slice(4, 6)
    with pytest.raises(ValueError, match="weight shape"):
        flatten_weight(w.reshape(6, 3, 3, 1), geometry)
    with pytest.raises(ValueError, match="does not fit"):
        patches(np.zeros((1, 4, 9, 8)), geometry)
    with pytest.raises(ValueError, match="kernel_shape"):
        ConvGeometry.from_attributes({"kernel_shape": [3, 1]}, (6, 1, 3, 3))
    with pytest.raises(ValueError, match="groups"):
        ConvGeometry.from_attributes({"group": 2}, (3, 1, 3, 3))
    with pytest.raises(ValueError, match="seen"):
        PatchGram(geometry).update(np.zeros((1, 3, 9, 8)), np.zeros((1, 3, 9, 8)))


def stuffed(x: np.ndarray, strides: tuple[int, ...]) -> np.ndarray:
    """x with strides-1 zeros between neighbours along each spatial axis."""
    out = np.zeros(x.shape[:2] + tuple((n - 1) * s + 1 for n, s in zip(x.shape[2:], strides)))
    out[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    return out


@pytest.mark.parametrize("c,m,group,kernel,spatial,strides,dilations,pads,output_padding", [
    (3, 4, 1, (3,), (7,), (2,), (1,), (1, 0), (1,)),
    (4, 6, 2, (3, 2), (5, 4), (2, 3), (2, 1), (1, 0, 2, 1), (1, 2)),
    (2, 2, 2, (2, 2), (4, 5), (1, 2), (1, 1), (0, 0, 0, 0), (0, 0)),
])
def test_conv_transpose_is_a_conv_of_the_stuffed_input(c, m, group, kernel, spatial, strides, dilations, pads,
                                                       output_padding):
    """The claim of docs/conv.md: ConvTranspose (weight [C, M/g, k..]) is a Conv (stride 1) of the
    input stuffed with stride-1 zeros, padded (k-1)d - pad (+ output_padding at the end), with the
    kernel flipped and each group's [C/g, M/g] block transposed; so patches and PatchGram carry it."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, c, *spatial)).astype(np.float32)
    w = rng.standard_normal((c, m // group, *kernel)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "W", "b"], ["y"], group=group, strides=strides,
                            dilations=dilations, pads=pads, output_padding=output_padding)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    (expected,) = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                          "disabled").run(None, {"x": x})
    d = len(kernel)
    reach = [(k - 1) * dil for k, dil in zip(kernel, dilations)]
    geometry = ConvGeometry(m, c, group, kernel, (1,) * d, dilations,
                            tuple(r - p for r, p in zip(reach, pads[:d]))
                            + tuple(r - p + o for r, p, o in zip(reach, pads[d:], output_padding)))
    c_group, m_group = c // group, m // group
    w_conv = (w.reshape(group, c_group, m_group, *kernel).swapaxes(1, 2).reshape(m, c_group, *kernel)
              [(slice(None), slice(None)) + (slice(None, None, -1),) * d])
    np.testing.assert_allclose(numpy_conv(stuffed(x, strides), w_conv, b, geometry), expected, rtol=1e-5, atol=1e-5)


def dq_conv_model(q: np.ndarray, storage: int, scale: np.ndarray, bias: np.ndarray, group: int, opset: int,
                  x_shape: tuple[int, ...], dq_attrs: dict) -> onnx.ModelProto:
    """x -> Conv(DequantizeLinear(q, scale), bias): the lowered form of a quantized Conv (3x3, pad 1)."""
    inits = [numpy_helper.from_array(q.astype(helper.tensor_dtype_to_np_dtype(storage)), "q"),
             numpy_helper.from_array(scale.astype(np.float32), "scale"),
             numpy_helper.from_array(bias.astype(np.float32), "bias")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale"], ["w"], **dq_attrs),
             helper.make_node("Conv", ["x", "w", "bias"], ["y"], group=group, pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", len(q), *x_shape[1:]])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


STORAGE = [pytest.param(bits, storage, opset, id=f"INT{bits}-opset{opset}")
           for bits, storage, opset in [(2, TensorProto.INT2, 25), (4, TensorProto.INT4, 21),
                                        (8, TensorProto.INT8, 13)]]


@pytest.mark.parametrize("bits,storage,opset", STORAGE)
@pytest.mark.parametrize("c,m,group", [(4, 6, 1), (6, 4, 2), (4, 4, 4), (4, 8, 4)],
                         ids=["full", "grouped", "depthwise", "depthwise-x2"])
def test_per_channel_dequantize_conv_runs_alike_at_every_level(bits, storage, opset, c, m, group):
    """DequantizeLinear(axis=0) on an INTb [M, C/g, 3, 3] initializer -> Conv, as numpy computes it."""
    rng = np.random.default_rng(bits * 100 + group)
    grid = IntegerGrid(bits)
    q = rng.integers(grid.qmin, grid.qmax + 1, (m, c // group, 3, 3))
    scale = rng.uniform(0.05, 0.2, m).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    x = rng.standard_normal((2, c, 7, 6)).astype(np.float32)
    model = dq_conv_model(q, storage, scale, bias, group, opset, (c, 7, 6), {"axis": 0})
    geometry = ConvGeometry(m, c, group, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    expected = numpy_conv(x, scale[:, None, None, None] * q.astype(np.float32), bias, geometry)
    outputs = {level: session(model, level).run(None, {"x": x})[0] for level in LEVELS}
    for level, y in outputs.items():
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * 2 ** bits, err_msg=level)
        assert np.array_equal(y, outputs["disabled"]), level


@pytest.mark.parametrize("bits,storage,opset", [
    pytest.param(bits, storage, opset, id=f"INT{bits}-opset{opset}")
    for bits, storage, opset in [(2, TensorProto.INT2, 25), (4, TensorProto.INT4, 21), (8, TensorProto.INT8, 21)]])
@pytest.mark.parametrize("c,group,block", [(6, 1, 4), (8, 2, 2)])
def test_blocks_along_input_channels_are_a_step_per_variable(bits, storage, opset, c, group, block):
    """DequantizeLinear(axis=1, block_size) on [M, C/g, kh, kw]: one scale per (channel, block of
    input channels, kernel offset), scale [M, ceil(C/g / block), kh, kw]. Repeated to the weight's
    shape and flattened like the weight, it is the QUBO's step per variable; the energy of the
    integers equals the output error of the deployed DQ -> Conv."""
    rng = np.random.default_rng(bits)
    m, c_group = 4, c // group
    blocks = -(-c_group // block)
    scale = rng.uniform(0.05, 0.2, (m, blocks, 3, 3)).astype(np.float32)
    full_scale = np.repeat(scale, block, axis=1)[:, :c_group]  # [M, C/g, 3, 3]
    geometry = ConvGeometry(m, c, group, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    case = Case(c, m, group, (3, 3), (6, 6), {"pads": [1, 1, 1, 1]})
    x, w, b = random_conv(case, seed=bits, batch=2)
    w = w * np.float32(0.1 * 2 ** (bits - 1))
    acc = PatchGram(geometry)
    acc.update(x)
    gram = acc.result().gram[:, :-1, :-1]
    step = flatten_weight(full_scale.astype(np.float64), geometry)
    problems = [build_problem(flatten_weight(w.astype(np.float64), geometry)[rows], step[rows], 0, 1.0,
                              IntegerGrid(bits), gram[g]) for g in range(group) for rows in [geometry.rows_of(g)]]
    choices = [rng.random(p.shape) < 0.5 for p in problems]
    q = unflatten_weight(np.concatenate([p.integers(ch) for p, ch in zip(problems, choices)]), geometry)
    model = dq_conv_model(q, storage, scale, b, group, opset, (c, 6, 6), {"axis": 1, "block_size": block})
    outputs = {level: session(model, level).run(None, {"x": x})[0] for level in LEVELS}
    for level, y in outputs.items():
        assert np.array_equal(y, outputs["disabled"]), level
    y_float = numpy_conv(x, w, b, geometry)
    measured = ((y_float - outputs["disabled"]) ** 2).sum(axis=1).mean()
    np.testing.assert_allclose(sum(p.energy(ch) for p, ch in zip(problems, choices)), measured, rtol=1e-4)
