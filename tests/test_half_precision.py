"""Half-precision (FLOAT16) dense layers outside a language model: Gemm with its C and MatMul + Add,
with zero points and bias correction (the correction's constants in float16 too), written with
FLOAT16 scales in both forms; each form at onnxruntime's default and basic levels against the
portable model run with optimizations disabled, and both forms' codes read back equal."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import runs
from onnx import TensorProto, helper, numpy_helper

X = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float16)


def half_model(form: str) -> onnx.ModelProto:
    """x [B, 32] -> dense 32 -> 24 -> Relu -> dense 24 -> 8 (its last block of 16 inputs cut short),
    every tensor FLOAT16; ``form``: Gemm(transB=1) with C, or MatMul + Add."""
    rng = np.random.default_rng(0)
    inits, nodes, tensor = [], [], "x"
    for k, (f, n) in enumerate(((32, 24), (24, 8))):
        w = (rng.standard_normal((n, f)) / np.sqrt(f)).astype(np.float16)
        b = rng.standard_normal(n).astype(np.float16)
        out = "y" if k else "h"
        if form == "gemm":
            inits += [numpy_helper.from_array(w, f"W{k}"), numpy_helper.from_array(b, f"b{k}")]
            nodes.append(helper.make_node("Gemm", [tensor, f"W{k}", f"b{k}"], [out], transB=1, name=f"fc{k}"))
        else:
            inits += [numpy_helper.from_array(w.T.copy(), f"W{k}"), numpy_helper.from_array(b, f"b{k}")]
            nodes += [helper.make_node("MatMul", [tensor, f"W{k}"], [f"{out}_mm"], name=f"fc{k}"),
                      helper.make_node("Add", [f"{out}_mm", f"b{k}"], [out], name=f"add{k}")]
        if not k:
            nodes.append(helper.make_node("Relu", ["h"], ["r"], name="relu"))
            tensor = "r"
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["B", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["B", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0].astype(np.float32)


@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_half_precision_layers_are_written_with_half_scales_and_run_as_the_reference(form, tmp_path):
    written = {}
    for format in ("qdq", "ort"):
        report = runs.quantize(half_model(form), tmp_path / f"{format}.onnx", calibration={"x": X}, bits=4,
                               granularity="block", block_size=16, symmetric=False, bias_correction=True,
                               format=format, ort_accuracy_level=0, speed=False)
        assert [layer.name for layer in report.layers] == ["fc0", "fc1"]
        written[format] = onnx.load(str(tmp_path / f"{format}.onnx"))
    inits = {f: {i.name: numpy_helper.to_array(i) for i in m.graph.initializer} for f, m in written.items()}
    dq = [n for n in written["qdq"].graph.node if n.op_type == "DequantizeLinear"]
    nbits = [n for n in written["ort"].graph.node if n.op_type == "MatMulNBits"]
    assert len(dq) == len(nbits) == 2
    assert all(inits["qdq"][n.input[1]].dtype == np.float16 for n in dq)
    assert all(inits["ort"][n.input[2]].dtype == np.float16 for n in nbits)
    for node, kernel in zip(dq, nbits):  # the same codes in both files (two 4-bit codes per byte)
        packed = inits["ort"][kernel.input[1]]
        codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(len(packed), -1)
        assert np.array_equal(codes[:, :inits["qdq"][node.input[0]].shape[1]], inits["qdq"][node.input[0]])
        assert np.array_equal(inits["ort"][kernel.input[2]].reshape(len(packed), -1), inits["qdq"][node.input[1]])
    reference = run(written["qdq"], ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    scale = np.linalg.norm(reference)
    for model in written.values():  # float16 activations' rounding apart (measured: 0 and 2.4-3.9e-4)
        for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
            assert np.linalg.norm(run(model, level) - reference) < 1e-3 * scale
    floats = run(half_model(form), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert np.linalg.norm(reference - floats) < 0.1 * scale  # 4 bits in blocks of 16 (measured: 0.029)
