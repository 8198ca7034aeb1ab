"""Conv layers end to end: the cost the report states (the QUBO energy over the streamed patch
Gram) equals the Conv's output error measured in onnxruntime (squared error summed over
channels, averaged over every output position of every sample), for 1-3 spatial axes, strides,
pads, dilations and every scheme; the written model is the same at onnxruntime's default and
basic levels as with optimizations disabled."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from runs import quantize

from onnx_qubo.model.discovery import find_dense_layers

LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          ort.GraphOptimizationLevel.ORT_DISABLE_ALL]


def conv_model(spatial=(9, 8), channels=(3, 5), kernel=(3, 3), bias=True, second=False, seed=0, group=1,
               **attributes):
    """x [B, C, *spatial] -> Conv (-> Relu -> Conv 1x1...) with random weights."""
    rng = np.random.default_rng(seed)
    c, m = channels
    inits = [numpy_helper.from_array(rng.standard_normal((m, c // group, *kernel)).astype(np.float32) / 3, "W")]
    if group > 1:
        attributes["group"] = group
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "B"))
        inputs.append("B")
    nodes = [helper.make_node("Conv", inputs, ["h" if second else "y"], name="conv", **attributes)]
    if second:
        inits.append(numpy_helper.from_array(rng.standard_normal((4, m, *[1] * len(kernel))).astype(np.float32),
                                             "W2"))
        nodes += [helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", c, *spatial])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             ["B", *[None] * (1 + len(kernel))])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


MODELS = {
    "2d-stride-pad": lambda: conv_model(strides=[2, 1], pads=[1, 0, 1, 2]),
    "2d-dilation-same": lambda: conv_model(dilations=[2, 1], pads=[2, 1, 2, 1]),
    "2d-auto-pad": lambda: conv_model(auto_pad="SAME_UPPER", strides=[2, 2]),
    "1d": lambda: conv_model(spatial=(20,), kernel=(5,), strides=[3], pads=[2, 2]),
    "3d": lambda: conv_model(spatial=(5, 6, 4), kernel=(3, 2, 2), pads=[1, 0, 1, 1, 1, 0], bias=False),
    "2d-groups": lambda: conv_model(channels=(4, 6), group=2, pads=[1, 1, 1, 1]),
    "2d-depthwise": lambda: conv_model(channels=(4, 8), group=4, strides=[2, 1], dilations=[1, 2],
                                       pads=[1, 2, 1, 2]),
}
SCHEMES = {
    "int2-channel": dict(bits=2),
    "int4-block-asymmetric": dict(bits=4, granularity="block", block_size=4, symmetric=False),
    "int3-tensor": dict(bits=3, granularity="tensor"),
    "int8-block": dict(bits=8, granularity="block", block_size=4),  # --small-layers' width beside low-bit layers
    "bias-quantize": dict(bits=4, bias="quantize"),
    "inputs-uint8": dict(bits=4, activations="uint8"),
}


def run(model, x, level=LEVELS[0]):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].astype(np.float64)


def measured_error(float_model, quantized, x):
    y_float, y_quant = run(float_model, x), run(quantized, x)
    return float(((y_quant - y_float) ** 2).sum(axis=1).mean())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.slow
def test_conv_cost_is_the_output_error_measured_in_onnxruntime(model_name, scheme, tmp_path):
    model = MODELS[model_name]()
    shape = [d.dim_value or 24 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    report = quantize(model, tmp_path / "q.onnx", calibration={"x": x}, batch_size=7, speed=False, **SCHEMES[scheme])
    assert [(layer.name, layer.form) for layer in report.layers] == [("conv", find_dense_layers(model)[0][0].label)]
    quantized = onnx.load(tmp_path / "q.onnx")
    assert report.layers[0].final_cost == pytest.approx(measured_error(model, quantized, x), rel=1e-3)
    assert report.layers[0].cost_solved <= report.layers[0].cost_rtn * (1 + 1e-9)
    reference = run(quantized, x, LEVELS[-1])
    for level in LEVELS[:2]:
        np.testing.assert_allclose(run(quantized, x, level), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels, group", [((3, 5), 1), ((4, 8), 4)])
def test_sequential_conv_layers_cost_is_the_whole_model_error(channels, group, tmp_path):
    model = conv_model(channels=channels, group=group, second=True, pads=[1, 1, 1, 1])
    x = np.random.default_rng(2).standard_normal((24, channels[0], 9, 8)).astype(np.float32)
    report = quantize(model, tmp_path / "q.onnx", bits=2, calibration={"x": x}, sequential=True,
                      bias_correction=True, speed=False)
    assert [layer.name for layer in report.layers] == ["conv", "conv2"]
    quantized = onnx.load(tmp_path / "q.onnx")
    assert report.layers[-1].cost_bias_corrected == pytest.approx(measured_error(model, quantized, x), rel=1e-3)


@pytest.mark.parametrize("bias", [True, False])
def test_bias_correction_goes_into_the_conv_bias_and_cancels_the_mean_error(bias, tmp_path):
    """The correction is folded into Conv's B (created where the Conv had none), so the corrected
    model has the plain model's nodes; the mean error per output channel is then zero, at every
    level."""
    model = conv_model(bias=bias, pads=[1, 1, 1, 1])
    x = (np.random.default_rng(4).standard_normal((24, 3, 9, 8)) + 0.5).astype(np.float32)
    common = dict(bits=2, calibration={"x": x}, solver="rtn", speed=False)
    quantize(model, tmp_path / "plain.onnx", bias_correction=False, **common)
    report = quantize(model, tmp_path / "c.onnx", bias_correction=True, **common)
    plain, corrected = onnx.load(tmp_path / "plain.onnx"), onnx.load(tmp_path / "c.onnx")
    assert [n.op_type for n in corrected.graph.node] == [n.op_type for n in plain.graph.node]
    conv = next(n for n in corrected.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and conv.input[2] in {i.name for i in corrected.graph.initializer}
    assert "B" not in {i.name for i in corrected.graph.initializer}  # the replaced bias is gone
    y = run(model, x)
    assert np.abs((y - run(plain, x)).mean(axis=(0, 2, 3))).max() > 1e-2
    for level in LEVELS:
        np.testing.assert_allclose((y - run(corrected, x, level)).mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    assert report.layers[0].cost_bias_corrected == pytest.approx(measured_error(model, corrected, x), rel=1e-3)


def test_a_grouped_conv_is_one_problem_per_group_written_as_one_conv(tmp_path):
    model = conv_model(channels=(4, 8), group=4, pads=[1, 1, 1, 1])
    x = np.random.default_rng(3).standard_normal((20, 4, 9, 8)).astype(np.float32)
    report = quantize(model, tmp_path / "q.onnx", bits=3, calibration={"x": x}, layer_bits={"conv": 4},
                      dump_qubo=tmp_path / "dump", speed=False)
    assert [(layer.name, layer.n_out, layer.f_in, layer.bits) for layer in report.layers] == [("conv", 8, 9, 4)]
    index = json.loads((tmp_path / "dump" / "index.json").read_text())
    assert [entry["layer"] for entry in index] == [f"conv[{g}]" for g in range(4)]  # a QUBO file per group
    written = onnx.load(tmp_path / "q.onnx")
    assert [n.op_type for n in written.graph.node].count("Conv") == 1
    quantized = next(i for i in written.graph.initializer if i.name == "W_quantized")
    assert list(quantized.dims) == [8, 9]
