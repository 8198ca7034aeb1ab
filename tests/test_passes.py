"""Graph passes: each emitted form must match numpy with the dequantized weights, under
onnxruntime's default optimization level (what users run) as well as the basic level."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import gemm_model, matmul_model
from onnx_qubo.passes import CheckModel, InsertDequantize, QuantizedWeight, RaiseOpset, run_passes
from onnx_qubo.passes.opset import default_opset

LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC]
STORAGE = {2: (TensorProto.INT2, 25), 4: (TensorProto.INT4, 21), 8: (TensorProto.INT8, 13)}


def run(model, x, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def numpy_forward(model, weight_t, x):
    """The original graph's math with W^T replaced by ``weight_t`` ([f, n])."""
    node = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    y = x.astype(np.float64) @ weight_t * attrs.get("alpha", 1.0)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if node.op_type == "Gemm" and len(node.input) > 2:
        y = y + attrs.get("beta", 1.0) * inits["C"]
    if node.op_type == "MatMul" and "b" in inits:
        y = y + inits["b"]
    return np.maximum(y, 0) if model.graph.node[-1].op_type == "Relu" else y


def quantize_w(model, bits, rank, rng):
    n, f = (5, 6)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    integers = rng.integers(qmin, qmax + 1, size=(n, f))
    scale = rng.random(n) * 0.5 + 0.1
    storage, opset = STORAGE[bits]
    out = run_passes(model, [RaiseOpset(opset),
                             InsertDequantize([QuantizedWeight("W", integers, scale, storage, rank)]),
                             CheckModel()])
    return out, (integers * scale.astype(np.float32)[:, None]).T.astype(np.float64)


FORMS = {
    "gemm_transB1": (lambda: gemm_model(trans_b=1, alpha=0.8, beta=0.5), 2, (4, 6)),
    "gemm_transB0": (lambda: gemm_model(trans_b=0, alpha=1.5), 2, (4, 6)),
    "gemm_no_bias": (lambda: gemm_model(bias=False), 2, (4, 6)),
    "matmul_add": (lambda: matmul_model(bias=True), 2, (4, 6)),
    "matmul": (lambda: matmul_model(bias=False), 2, (4, 6)),
    "matmul_3d": (lambda: matmul_model(bias=True, leading=(3,)), 3, (4, 3, 6)),
    "matmul_4d": (lambda: matmul_model(bias=False, leading=(2, 3)), 4, (4, 2, 3, 6)),
}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("form", FORMS)
def test_every_emitted_form_is_exact_at_default_and_basic_levels(form, bits):
    make, rank, x_shape = FORMS[form]
    model = make()
    rng = np.random.default_rng(bits)
    x = rng.standard_normal(x_shape).astype(np.float32)
    quantized, weight_t = quantize_w(model, bits, rank, rng)

    expected = numpy_forward(model, weight_t, x)
    for level in LEVELS:
        np.testing.assert_allclose(run(quantized, x, level), expected, rtol=1e-5, atol=1e-5)

    inits = {i.name: i for i in quantized.graph.initializer}
    assert "W" not in inits
    assert inits["W_quantized"].data_type == STORAGE[bits][0]
    assert len(inits["W_quantized"].raw_data) == -(-30 * bits // 8)  # packed: bits per weight
    assert default_opset(quantized) == max(17, STORAGE[bits][1])  # raised, never lowered
    dq = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and helper.get_attribute_value(dq[0].attribute[0]) == 0  # axis=0
    consumer = next(n for n in quantized.graph.node if dq[0].output[0] in n.input)
    assert consumer.op_type == "Gemm"
    assert {a.name: helper.get_attribute_value(a) for a in consumer.attribute}["transB"] == 1


def test_insert_does_not_touch_its_input():
    model = gemm_model()
    before = model.SerializeToString()
    InsertDequantize([QuantizedWeight("W", np.zeros((5, 6), int), np.ones(5), TensorProto.INT8, 2)]).call(model)
    assert model.SerializeToString() == before


def test_insert_refuses_a_shared_weight():
    model = gemm_model()
    model.graph.node.append(helper.make_node("Gemm", ["x", "W"], ["z"], transB=1))
    with pytest.raises(ValueError, match="read by 2 nodes"):
        InsertDequantize([QuantizedWeight("W", np.zeros((5, 6), int), np.ones(5), TensorProto.INT8, 2)]).call(model)


def test_raise_opset_bumps_when_no_definition_changed_and_converts_otherwise():
    simple = gemm_model()  # Gemm + Relu: same definitions at 17 and 25
    raised = RaiseOpset(25).call(simple)
    assert raised.modified and default_opset(raised.model) == 25
    assert raised.model.ir_version >= onnx.helper.find_min_ir_version_for(list(raised.model.opset_import))
    assert RaiseOpset(13).call(simple).modified is False

    # Reshape changed definition between 17 and 25: the version converter rewrites it
    shape = numpy_helper.from_array(np.array([-1, 6], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6])], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = run_passes(model, [RaiseOpset(25), CheckModel()])
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    np.testing.assert_array_equal(run(out, x, LEVELS[0]), x.reshape(2, 6))
    assert default_opset(out) == 25


def test_check_model_rejects_an_invalid_graph():
    model = gemm_model()
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(Exception):
        CheckModel().call(model)
