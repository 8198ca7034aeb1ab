"""Tiny ONNX graphs for tests, built with onnx.helper the way each exporter writes dense layers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, initializers, opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _floats(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def gemm_model(f=6, n=5, trans_b=1, alpha=1.0, beta=1.0, bias=True, seed=0, relu=True) -> onnx.ModelProto:
    """x [B, f] -> Gemm(W, C) (-> Relu); W stored [n, f] when trans_b else [f, n] (PyTorch: trans_b=1)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, f) if trans_b else (f, n)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C"))
        inputs.append("C")
    nodes = [helper.make_node("Gemm", inputs, ["h" if relu else "y"], transB=trans_b, alpha=alpha, beta=beta,
                              name="dense")]
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["y"], name="relu"))
    return _model(nodes, [_floats("x", ["B", f])], [_floats("y", ["B", n])], inits)


def matmul_model(f=6, n=5, bias=True, leading=(), seed=0) -> onnx.ModelProto:
    """x [B, *leading, f] -> MatMul(W [f, n]) (-> Add(b)): skl2onnx / Keras / transformer style."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((f, n)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h" if bias else "y"], name="dense")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="bias_add"))
    shape = ["B", *leading]
    return _model(nodes, [_floats("x", [*shape, f])], [_floats("y", [*shape, n])], inits)


def mlp_model(widths=(8, 6, 4), seed=0) -> onnx.ModelProto:
    """Two Gemm(transB=1) layers with a Relu between: a small network end to end."""
    rng = np.random.default_rng(seed)
    inits, nodes, tensor = [], [], "x"
    for k, (f, n) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [numpy_helper.from_array(rng.standard_normal((n, f)).astype(np.float32), f"W{k}"),
                  numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{k}")]
        out = "y" if k == len(widths) - 2 else f"h{k}"
        nodes.append(helper.make_node("Gemm", [tensor, f"W{k}", f"b{k}"], [out], transB=1, name=f"fc{k}"))
        if out != "y":
            nodes.append(helper.make_node("Relu", [out], [f"r{k}"], name=f"relu{k}"))
            tensor = f"r{k}"
    return _model(nodes, [_floats("x", ["B", widths[0]])], [_floats("y", ["B", widths[-1]])], inits)


def weight_of(model: onnx.ModelProto, name: str = "W") -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)
