"""Every quantization scheme end to end: the cost the report states (the QUBO energy of the
chosen rounding) must equal the output error measured by running the float and the quantized
model in onnxruntime on the calibration data. This checks the scales, zero points, blocks,
quantized bias, quantized inputs and sequential statistics in the QUBO against the graph
that is actually emitted."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from runs import quantize

from graphs import gemm_model, matmul_model, mlp_model

SCHEMES = {
    "tensor": dict(granularity="tensor"),
    "channel-asymmetric": dict(symmetric=False),
    "block-asymmetric": dict(granularity="block", block_size=4, symmetric=False),
    "block-uneven": dict(granularity="block", block_size=5),  # 12 inputs: blocks of 5, 5, 2
    "bias-quantize": dict(bias="quantize"),
    "bias-quantize-asymmetric": dict(bias="quantize", symmetric=False),
    "inputs-uint8": dict(activations="uint8"),
    "inputs-int8-percentile": dict(activations="int8", activation_range="percentile"),
    "inputs-uint8-block-bias": dict(activations="uint8", granularity="block", block_size=4, bias="quantize"),
    "scale-qubo-tensor": dict(scale="qubo", granularity="tensor"),
    "scale-qubo-block": dict(scale="qubo", granularity="block", block_size=4, symmetric=False),
}
MODELS = {
    "gemm": lambda: gemm_model(f=12, n=7, trans_b=0, alpha=-0.7, beta=0.5, relu=False),
    "matmul-3d": lambda: matmul_model(f=12, n=7, bias=True, leading=(3,)),
}


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.float64)


def measured_error(float_model, quantized_path, x) -> float:
    """Mean over input vectors of the squared output error, summed over outputs."""
    y_float, y_quant = run(float_model, x), run(onnx.load(quantized_path), x)
    return float(((y_quant - y_float) ** 2).reshape(-1, y_float.shape[-1]).sum(axis=1).mean())


def calibration(model_name, rng):
    shape = (300, 12) if model_name == "gemm" else (100, 3, 12)
    return (rng.standard_normal(shape) + 0.3).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.slow
def test_reported_cost_is_the_measured_output_error(model_name, scheme, bits, tmp_path):
    model = MODELS[model_name]()
    x = calibration(model_name, np.random.default_rng(bits))
    out = tmp_path / "q.onnx"
    report = quantize(model, out, bits=bits, calibration={"x": x}, batch_size=64, **SCHEMES[scheme])
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert report.evaluation.default_matches_basic
    cost = sum(layer.final_cost for layer in report.layers)  # after the default bias correction
    assert cost == pytest.approx(measured_error(model, out, x), rel=1e-3)
    assert cost <= sum(layer.cost_rtn for layer in report.layers) * (1 + 1e-9)  # below round to nearest


@pytest.mark.parametrize("scheme", [dict(), dict(activations="uint8"), dict(activations="int8", bias="int32")])
@pytest.mark.slow
def test_bias_correction_cost_is_the_measured_error_after_correction(scheme, tmp_path):
    model = MODELS["gemm"]()
    x = calibration("gemm", np.random.default_rng(0))
    out = tmp_path / "q.onnx"
    report = quantize(model, out, bits=2, calibration={"x": x}, bias_correction=True, **scheme)
    corrected = report.layers[0].cost_bias_corrected
    assert corrected < report.layers[0].cost_solved
    # an INT32 bias adds its own rounding (half a step of input x weight scale per output)
    assert corrected == pytest.approx(measured_error(model, out, x), rel=1e-3 if "bias" not in scheme else 2e-2)


@pytest.mark.slow
def test_int32_bias_follows_the_qdq_convention(tmp_path):
    model = MODELS["gemm"]()
    x = calibration("gemm", np.random.default_rng(0))
    out = tmp_path / "q.onnx"
    quantize(model, out, bits=4, calibration={"x": x}, activations="uint8", bias="int32")
    quantized = onnx.load(out)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in quantized.graph.initializer}
    bias = inits["C_quantized"]
    assert bias.dtype == np.int32
    weight_scale, input_scale = inits["W_scale"], inits["x_scale"]
    np.testing.assert_allclose(inits["C_scale"], (input_scale * weight_scale).astype(np.float32), rtol=1e-6)
    gemm = next(n for n in quantized.graph.node if n.op_type == "Gemm")
    assert gemm.input[2].startswith("C_dequantized")


@pytest.mark.parametrize("scheme", [dict(), dict(activations="uint8", bias="quantize")])
@pytest.mark.slow
def test_sequential_cost_of_the_last_layer_is_the_whole_model_error(scheme, tmp_path):
    """With --sequential the last layer's problem is built from the inputs the quantized
    earlier layers produce, against the float model's output: its cost is the model's error."""
    model = mlp_model(widths=(10, 8, 6))
    x = (np.random.default_rng(0).standard_normal((400, 10))).astype(np.float32)
    out = tmp_path / "q.onnx"
    report = quantize(model, out, bits=2, calibration={"x": x}, sequential=True, **scheme)
    assert report.layers[-1].final_cost == pytest.approx(measured_error(model, out, x), rel=1e-3)
    plain = quantize(model, tmp_path / "p.onnx", bits=2, calibration={"x": x}, **scheme)
    # the first layer sees the same inputs either way
    assert report.layers[0].cost_solved == pytest.approx(plain.layers[0].cost_solved, rel=1e-9)


@pytest.mark.parametrize("scheme", [dict(), dict(activations="uint8")])
@pytest.mark.slow
def test_sequential_bias_correction_cost_is_the_whole_model_error_after_correction(scheme, tmp_path):
    """With --sequential and --bias-correction the last layer is solved about the means (the
    inputs' drift and cross terms centered too): its corrected cost is the model's measured error,
    and its uncorrected cost that error plus the squared mean the correction removes."""
    model = mlp_model(widths=(10, 8, 6))
    x = (np.random.default_rng(0).standard_normal((400, 10)) + 0.5).astype(np.float32)
    out = tmp_path / "q.onnx"
    report = quantize(model, out, bits=2, calibration={"x": x}, sequential=True, bias_correction=True, **scheme)
    last = report.layers[-1]
    assert last.cost_bias_corrected == pytest.approx(measured_error(model, out, x), rel=1e-3)
    assert last.cost_bias_corrected < last.cost_solved


@pytest.mark.parametrize("granularity", [dict(), dict(granularity="tensor"), dict(granularity="block", block_size=4)])
@pytest.mark.slow
def test_scale_search_on_the_solved_cost_never_costs_more_than_mse(granularity, tmp_path):
    model = mlp_model(widths=(12, 10, 6))
    x = np.random.default_rng(1).standard_normal((300, 12)).astype(np.float32)
    mse = quantize(model, tmp_path / "m.onnx", bits=2, calibration={"x": x}, **granularity)  # fc1 at 4 bits
    qubo = quantize(model, tmp_path / "q.onnx", bits=2, calibration={"x": x}, scale="qubo", **granularity)
    for a, b in zip(qubo.layers, mse.layers):  # the cost as written: both layers have a bias, so corrected
        assert a.cost_bias_corrected is not None and a.final_cost <= b.final_cost * (1 + 1e-9)


def test_each_rounding_is_reported_after_its_own_bias_correction(tmp_path):
    """Where a layer's bias absorbs the mean error, the solver minimizes what the correction leaves:
    the report compares that with what round to nearest leaves after its own correction (a run
    with ``--solver rtn`` writes exactly that), and totals every layer, corrected or not."""
    rng = np.random.default_rng(5)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "W0"),
             onnx.numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "W1"),
             onnx.numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b1")]
    nodes = [onnx.helper.make_node("MatMul", ["x", "W0"], ["h"], name="no_bias"),
             onnx.helper.make_node("Relu", ["h"], ["r"]),
             onnx.helper.make_node("Gemm", ["r", "W1", "b1"], ["y"], transB=1, name="with_bias")]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 10])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 6])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = (rng.standard_normal((300, 10)) + 0.7).astype(np.float32)
    options = dict(bits=4, scale="minmax", calibration={"x": x}, speed=False)
    solved = quantize(model, tmp_path / "solved.onnx", **options)
    rtn = quantize(model, tmp_path / "rtn.onnx", solver="rtn", **options)
    assert [layer.cost_bias_corrected is None for layer in solved.layers] == [True, False]
    with_bias = solved.layers[1]
    assert with_bias.cost_rtn_bias_corrected < with_bias.cost_rtn  # the correction removes RTN's mean error too
    for layer, plain in zip(solved.layers, rtn.layers):
        assert layer.final_cost_rtn == pytest.approx(plain.final_cost, rel=1e-9)
        assert layer.final_cost <= layer.final_cost_rtn * (1 + 1e-9)
    assert f"-> {sum(layer.final_cost for layer in solved.layers):.4g}" in solved.to_text()
