"""Random dense-layer models and schemes for the property-based fuzzer (tests/test_fuzz.py), and an
oracle that evaluates a quantized model in numpy from what its file holds.

The oracle shares no code with the library: it reads the integers, scales and zero points back
from the written file, walks the graph node by node and computes each operator as the ONNX
specification defines it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

WIDTHS = st.integers(1, 70)


@dataclass(frozen=True)
class Layer:
    """One dense layer of a chain. ``kind``: gemm | matmul; ``bias``: None or the bias shape
    (``()`` a scalar), ``bias_left``: the Add reads the bias first; ``then``: activation after."""

    kind: str
    n: int
    trans_b: int = 1
    alpha: float = 1.0
    beta: float = 1.0
    bias: tuple[int, ...] | None = None
    bias_left: bool = False
    then: str = "none"


@dataclass(frozen=True)
class Case:
    """A model (input width ``f``, ``lead`` extra axes for N-D MatMul chains), its data and a scheme.
    ``in_loop``: the chain runs in an If branch inside a Loop of LOOP_TRIPS iterations, taken on
    even iterations (on x * (i + 1)) while odd ones keep the carried value: the branch taken
    changes between iterations (issue 20)."""

    f: int
    lead: tuple[int, ...]
    layers: tuple[Layer, ...]
    opset: int
    samples: int
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    in_loop: bool = False


LOOP_TRIPS = 3


@st.composite
def cases(draw: st.DrawFn) -> Case:
    lead = draw(st.sampled_from([(), (), (3,), (2, 2)]))  # N-D activations: MatMul chains only
    f = draw(WIDTHS)
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(WIDTHS)
        then = draw(st.sampled_from(["none", "Relu", "Tanh"]))
        if not lead and draw(st.booleans()):
            layers.append(Layer("gemm", n, trans_b=draw(st.sampled_from([0, 1])),
                                alpha=draw(st.sampled_from([1.0, 0.5, -2.0])), beta=draw(st.sampled_from([1.0, 0.25])),
                                bias=draw(st.sampled_from([None, (n,), (1, n), ()])), then=then))
        else:
            rank = 1 + len(lead)
            shapes = [None, (n,), (1, n), (1,) * rank + (n,)] + ([(1,) * (rank - 1) + (n,)] if rank > 2 else [])
            layers.append(Layer("matmul", n, bias=draw(st.sampled_from(shapes)), bias_left=draw(st.booleans()),
                                then=then))
    bits = draw(st.integers(1, 8))
    granularity = draw(st.sampled_from(["channel", "tensor", "block"]))
    options = dict(
        bits=bits, granularity=granularity,
        block_size=draw(st.integers(1, 40)) if granularity == "block" else 0,
        symmetric=draw(st.booleans()), bias=draw(st.sampled_from(["float", "quantize", "int32"])),
        activations=draw(st.sampled_from(["none", "int8", "uint8"])), sequential=draw(st.booleans()),
        solver=draw(st.sampled_from(["rtn", "fast"])), scale=draw(st.sampled_from(["minmax", "mse"])))
    return Case(f, lead, tuple(layers), draw(st.integers(11, 21)), draw(st.integers(1, 40)),
                draw(st.integers(0, 2 ** 16)), options, in_loop=draw(st.integers(0, 3)) == 0)


def build(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The float model of ``case`` and its calibration data."""
    rng = np.random.default_rng(case.seed)
    nodes, inits = [], []
    tensor, width = "x", case.f
    for k, layer in enumerate(case.layers):
        out = f"h{k}"
        w_shape = (layer.n, width) if layer.kind == "gemm" and layer.trans_b else (width, layer.n)
        inits.append(numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), f"W{k}"))
        if layer.bias is not None:
            inits.append(numpy_helper.from_array(rng.standard_normal(layer.bias).astype(np.float32), f"b{k}"))
        if layer.kind == "gemm":
            inputs = [tensor, f"W{k}"] + ([f"b{k}"] if layer.bias is not None else [])
            nodes.append(helper.make_node("Gemm", inputs, [out], name=f"gemm{k}", transB=layer.trans_b,
                                          alpha=layer.alpha, beta=layer.beta))
        else:
            product = out if layer.bias is None else f"p{k}"
            nodes.append(helper.make_node("MatMul", [tensor, f"W{k}"], [product], name=f"matmul{k}"))
            if layer.bias is not None:
                pair = [f"b{k}", product] if layer.bias_left else [product, f"b{k}"]
                nodes.append(helper.make_node("Add", pair, [out], name=f"add{k}"))
        if layer.then != "none":
            nodes.append(helper.make_node(layer.then, [out], [f"a{k}"], name=f"act{k}"))
            out = f"a{k}"
        tensor, width = out, layer.n
    if case.in_loop:
        nodes, inits = _in_loop(nodes, tensor, case), inits + _loop_constants()
        tensor = "y_loop"
    nodes.append(helper.make_node("Identity", [tensor], ["y"], name="out"))
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["B", *case.lead, case.f])], [], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 7
    if case.in_loop:  # the carried value changes shape (x, then the chain's output): declared by hand
        model.graph.output.append(helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["B", *case.lead, case.layers[-1].n]))
    else:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.value_info
        model.graph.output.append(next(v for v in inferred if v.name == "y"))  # the output's inferred shape
    onnx.checker.check_model(model, full_check=True)
    x = rng.standard_normal((case.samples, *case.lead, case.f)).astype(np.float32)
    return model, {"x": x}


def _in_loop(chain: list[onnx.NodeProto], out: str, case: Case) -> list[onnx.NodeProto]:
    """The main graph's nodes running ``chain`` (reading x, writing ``out``) in the then-branch of
    an If inside a Loop (``Case.in_loop``): iteration i feeds it x * (i + 1) when i is even, and
    keeps the carried value (x at first) when odd; the loop's result is ``y_loop``."""
    rank = 2 + len(case.lead)
    unknown = [None] * rank
    for node in chain:  # the chain reads x scaled by the iteration
        node.input[:] = ["x_scaled" if name == "x" else name for name in node.input]
    then = helper.make_graph([*chain, helper.make_node("Identity", [out], ["y_then"])], "then", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, unknown)])
    other = helper.make_graph([helper.make_node("Identity", ["y_in"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, unknown)])
    body = helper.make_graph([
        helper.make_node("Cast", ["i"], ["i_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["i_float", "loop_one"], ["factor"]),
        helper.make_node("Mul", ["x", "factor"], ["x_scaled"]),
        helper.make_node("Mod", ["i", "loop_two"], ["parity"]),
        helper.make_node("Equal", ["parity", "loop_zero"], ["even"]),
        helper.make_node("If", ["even"], ["y_out"], then_branch=then, else_branch=other, name="branch"),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ], "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("y_in", TensorProto.FLOAT, unknown)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_out", TensorProto.FLOAT, unknown)])
    return [helper.make_node("Loop", ["loop_trips", "loop_true", "x"], ["y_loop"], body=body, name="loop")]


def _loop_constants() -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(np.array(1.0, np.float32), "loop_one"),
            numpy_helper.from_array(np.array(2, np.int64), "loop_two"),
            numpy_helper.from_array(np.array(0, np.int64), "loop_zero"),
            numpy_helper.from_array(np.array(LOOP_TRIPS, np.int64), "loop_trips"),
            numpy_helper.from_array(np.array(True), "loop_true")]


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range of a ``bits`` grid (README: signed [-2^(B-1), 2^(B-1)-1], unsigned [0, 2^B-1])."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


CONTAINER_BITS = {TensorProto.INT2: 2, TensorProto.UINT2: 2, TensorProto.INT4: 4, TensorProto.UINT4: 4,
                  TensorProto.INT8: 8, TensorProto.UINT8: 8}


def integer_ranges_fit(model: onnx.ModelProto, widths: set[int]) -> list[str]:
    """Problems with the low-bit integer initializers read by DequantizeLinear: values (and zero
    points) outside the grid of the widest of the layers' ``widths`` their type holds (INT32
    biases and 8-bit activations excepted). Exact where one width per container was used; with
    3 and 4 bits (an output layer at 4 below 4) both in INT4, the 3-bit codes are checked on 4."""
    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    for node in _all_nodes(model.graph):
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        init = inits[node.input[0]]
        if init.data_type == TensorProto.INT32:
            continue
        signed = init.data_type in (TensorProto.INT2, TensorProto.INT4, TensorProto.INT8)
        container = CONTAINER_BITS[init.data_type]
        bits = max(w for w in widths if container // 2 < w <= container or (container == 2 and w == 1))
        low, high = grid(bits, signed)
        for name in node.input[0:1] + node.input[2:3]:
            values = numpy_helper.to_array(inits[name]).astype(np.int64)
            if values.size and (values.min() < low or values.max() > high):
                problems.append(f"{name}: values in [{values.min()}, {values.max()}], grid [{low}, {high}]")
    return problems


NEAR_TIE = 1e-3  # a QuantizeLinear input this close to a rounding tie (in grid steps) may round either way:
# float32 kernels differ by a few 1e-6 relative between optimization levels, and from float64


def float_gemm_bias(model: onnx.ModelProto) -> bool:
    """Whether a Gemm of ``model`` reads a float initializer as its bias C."""
    floats = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    return any(n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in floats for n in _all_nodes(model.graph))


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` and of every graph nested in it."""
    found = []
    for node in graph.node:
        found.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += _all_nodes(attr.g)
    return found


def evaluate(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[list[np.ndarray], int, float]:
    """The model's outputs, computed in float64 by numpy from the operators' definitions; the
    number of QuantizeLinear inputs within NEAR_TIE of a rounding tie (there float32, as in
    onnxruntime, and float64 may honestly round to neighbouring integers); and the largest
    magnitude of any float tensor computed (float32 rounding noise scales with it)."""
    seen = {"ties": 0, "peak": 1.0}
    env: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in feed.items()}
    for init in model.graph.initializer:
        env[init.name] = _array(init)
    _run_graph(model.graph, env, seen)
    return [env[out.name] for out in model.graph.output], int(seen["ties"]), seen["peak"]


def _run_graph(graph: onnx.GraphProto, env: dict[str, np.ndarray], seen: dict[str, Any]) -> None:
    """Compute ``graph``'s nodes into ``env`` (which holds its inputs and outer scopes); Loop and
    If run their bodies in a copy of ``env``, as the specification scopes them."""
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = [env[name] if name else None for name in node.input]
        if node.op_type == "Loop":
            env[node.output[0]] = _loop(inputs, attrs["body"], env, seen)
        elif node.op_type == "If":
            branch = attrs["then_branch" if bool(inputs[0]) else "else_branch"]
            scope = dict(env)
            _run_graph(branch, scope, seen)
            env[node.output[0]] = scope[branch.output[0].name]
        else:
            env[node.output[0]] = _OPS[node.op_type](inputs, attrs)
        if env[node.output[0]].dtype.kind == "f" and env[node.output[0]].size:
            seen["peak"] = max(seen["peak"], float(np.abs(env[node.output[0]]).max()))
        if node.op_type == "QuantizeLinear":
            steps = inputs[0].astype(np.float64) / np.float64(inputs[1])
            seen["ties"] += int((np.abs(steps - np.floor(steps) - 0.5) < NEAR_TIE).sum())


def _loop(inputs: list, body: onnx.GraphProto, env: dict[str, np.ndarray], seen: dict[str, Any]) -> np.ndarray:
    """A Loop of a trip count, a true condition and one carried value (what build writes)."""
    carried = inputs[2]
    for i in range(int(inputs[0])):
        scope = dict(env)
        scope.update({body.input[0].name: np.array(i, np.int64), body.input[1].name: np.array(True),
                      body.input[2].name: carried})
        _run_graph(body, scope, seen)
        carried = scope[body.output[1].name]
    return carried


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    array = numpy_helper.to_array(tensor)
    if tensor.data_type in (TensorProto.INT2, TensorProto.UINT2, TensorProto.INT4, TensorProto.UINT4):
        return array.astype(np.int64)
    return array


def _gemm(inputs: list, attrs: dict) -> np.ndarray:
    a, b = inputs[0].astype(np.float64), inputs[1].astype(np.float64)
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + attrs.get("beta", 1.0) * inputs[2].astype(np.float64)
    return y


def _dequantize(inputs: list, attrs: dict) -> np.ndarray:
    q = inputs[0].astype(np.float64)
    scale = inputs[1].astype(np.float64)
    zero = inputs[2].astype(np.float64) if len(inputs) > 2 and inputs[2] is not None else np.zeros_like(scale)
    if scale.ndim == 0:
        return (q - zero) * scale
    axis = attrs.get("axis", 1) % q.ndim
    block = attrs.get("block_size", 0)
    if block:  # blocked: scale has the input's shape with ceil(size / block) along axis
        scale, zero = (np.repeat(t, block, axis=axis).take(range(q.shape[axis]), axis=axis) for t in (scale, zero))
        return (q - zero) * scale
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def _quantize(inputs: list, attrs: dict) -> np.ndarray:
    x, scale, zero = inputs[0].astype(np.float32), np.float32(inputs[1]), inputs[2]
    low, high = (-128, 127) if zero.dtype == np.int8 else (0, 255)
    return np.clip(np.rint(x / scale) + zero.astype(np.float64), low, high)


_OPS = {
    "Gemm": _gemm,
    "MatMul": lambda i, a: i[0].astype(np.float64) @ i[1].astype(np.float64),
    "Add": lambda i, a: i[0].astype(np.float64) + i[1].astype(np.float64),
    "Relu": lambda i, a: np.maximum(i[0], 0),
    "Tanh": lambda i, a: np.tanh(i[0]),
    "Identity": lambda i, a: i[0],
    "DequantizeLinear": _dequantize,
    "QuantizeLinear": _quantize,
    "Constant": lambda i, a: numpy_helper.to_array(a["value"]),
    "Shape": lambda i, a: np.array(i[0].shape, np.int64),
    "Slice": lambda i, a: i[0][int(i[1][0]):int(i[2][0])],
    "Concat": lambda i, a: np.concatenate(i, axis=a["axis"]),
    "Reshape": lambda i, a: i[0].reshape([int(d) for d in i[1]]),
    "Cast": lambda i, a: i[0].astype(helper.tensor_dtype_to_np_dtype(a["to"])),
    "Mul": lambda i, a: i[0].astype(np.float64) * i[1].astype(np.float64),
    "Mod": lambda i, a: np.mod(i[0], i[1]),
    "Equal": lambda i, a: np.equal(i[0], i[1]),
}


LEGITIMATE_REFUSALS = {  # the reasons the library may give for refusing a generated case
    "int32 bias without quantized inputs": r"bias int32 needs quantized inputs",
    "asymmetric 1-2 bit weights with quantized inputs (onnxruntime QGemm)": r"asymmetric 1-2 bit weights",
    "block size larger than the layer": r"granularity/block_size",
    "no dense layer quantizable": r"no quantizable dense layers found",
    "INT32 bias out of range": r"does not fit INT32",
}


def refusal_reason(message: str) -> str | None:
    """The legitimate reason behind a refusal message, or None for an unexpected one."""
    return next((reason for reason, pattern in LEGITIMATE_REFUSALS.items() if re.search(pattern, message)), None)


def leftovers(folder: Path, expected: set[str]) -> list[str]:
    """Files in ``folder`` other than ``expected`` (temporary files a run left behind)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in expected)
