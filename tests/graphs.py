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


def layernorm_model(f=32, hidden=48, n=8, seed=0, norm="op") -> onnx.ModelProto:
    """A transformer's feed-forward block as torch exports it: x [B, S, f] -> LayerNormalization
    (gains with a few large channels, as trained ones have) -> MatMul 'up' + Add -> Relu -> MatMul
    'down' + Add -> y [B, S, n]; with ``hidden=None`` 'up' alone, n wide. ``norm``: "op" the
    LayerNormalization op; "layer" the same norm decomposed as torch.onnx.export writes it below
    opset 17 (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add); "rms" a decomposed
    RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul: no mean subtracted, no shift) as the
    dynamo exporter writes it; "rms-div" the same with ``1 / Sqrt`` for the Reciprocal, as the
    TorchScript exporter writes ``torch.rsqrt``."""
    rng = np.random.default_rng(seed)
    gain = (1 + 0.1 * rng.standard_normal(f)) * np.where(rng.random(f) < 0.1, 8.0, 1.0)
    width = hidden or n
    inits = [numpy_helper.from_array(gain.astype(np.float32), "gamma"),
             numpy_helper.from_array((0.1 * rng.standard_normal(f)).astype(np.float32), "beta"),
             numpy_helper.from_array((rng.standard_normal((f, width)) / np.sqrt(f)).astype(np.float32), "W_up"),
             numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b_up")]
    if norm == "op":
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["normed"], axis=-1, name="norm")]
    else:
        inits += [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                  numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
        rms = norm.startswith("rms")
        centred = "x" if rms else "centred"
        nodes = [] if rms else [
            helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], name="mean"),
            helper.make_node("Sub", ["x", "mean"], ["centred"], name="centre")]
        nodes += [helper.make_node("Pow", [centred, "two"], ["squares"], name="square"),
                  helper.make_node("ReduceMean", ["squares"], ["variance"], axes=[-1], name="variance"),
                  helper.make_node("Add", ["variance", "eps"], ["shifted"], name="epsilon"),
                  helper.make_node("Sqrt", ["shifted"], ["deviation"], name="root")]
        if rms:
            inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
            nodes += [helper.make_node("Reciprocal", ["deviation"], ["inverse"], name="inverse") if norm == "rms" else
                      helper.make_node("Div", ["one", "deviation"], ["inverse"], name="inverse"),
                      helper.make_node("Mul", [centred, "inverse"], ["divided"], name="divide"),
                      helper.make_node("Mul", ["gamma", "divided"], ["normed"], name="gain")]
        else:
            nodes += [helper.make_node("Div", [centred, "deviation"], ["divided"], name="divide"),
                      helper.make_node("Mul", ["divided", "gamma"], ["scaled"], name="gain"),
                      helper.make_node("Add", ["scaled", "beta"], ["normed"], name="shift")]
    nodes += [helper.make_node("MatMul", ["normed", "W_up"], ["u"], name="up"),
              helper.make_node("Add", ["u", "b_up"], ["y" if hidden is None else "ub"], name="up_bias")]
    if hidden is not None:
        inits += [numpy_helper.from_array((rng.standard_normal((hidden, n)) / np.sqrt(hidden)).astype(np.float32),
                                          "W_down"),
                  numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b_down")]
        nodes += [helper.make_node("Relu", ["ub"], ["r"], name="relu"),
                  helper.make_node("MatMul", ["r", "W_down"], ["d"], name="down"),
                  helper.make_node("Add", ["d", "b_down"], ["y"], name="down_bias")]
    return _model(nodes, [_floats("x", ["B", "S", f])], [_floats("y", ["B", "S", n])], inits)


def weight_of(model: onnx.ModelProto, name: str = "W") -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def if_model(f=6, n=5, seed=0) -> onnx.ModelProto:
    """x_in [B, f] -> Gemm 'pre' -> Tanh -> x; If(cond): then Gemm 'fc_then'(x, W1, C1) (main-graph
    initializers read from the branch), else MatMul 'fc_else'(x, W2) + b2 with W2 a Constant node
    of the branch. Both branches read x from the main graph."""
    rng = np.random.default_rng(seed)
    w2 = rng.standard_normal((f, n)).astype(np.float32)
    then = helper.make_graph([helper.make_node("Gemm", ["x", "W1", "C1"], ["y_then"], transB=1, name="fc_then")],
                             "then", [], [_floats("y_then", ["B", n])])
    other = helper.make_graph([
        helper.make_node("Constant", [], ["W2"], value=numpy_helper.from_array(w2), name="w2_constant"),
        helper.make_node("MatMul", ["x", "W2"], ["h_else"], name="fc_else"),
        helper.make_node("Add", ["h_else", "b2"], ["y_else"], name="bias_else")], "else", [],
        [_floats("y_else", ["B", n])])
    inits = [numpy_helper.from_array(rng.standard_normal((f, f)).astype(np.float32), "W0"),
             numpy_helper.from_array(rng.standard_normal((n, f)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C1"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x_in", "W0"], ["pre_out"], transB=1, name="pre"),
             helper.make_node("Tanh", ["pre_out"], ["x"], name="tanh"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="branch")]
    return _model(nodes, [_floats("x_in", ["B", f]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                  [_floats("y", ["B", n])], inits)


def loop_model(f=6, n=5, trips=3, seed=0) -> onnx.ModelProto:
    """x [B, f]; Loop of ``trips`` iterations, iteration i: h_i = x * (i + 1) -> Gemm 'fc_loop'
    (W, C: main-graph initializers) -> y_i, stacked as the scan output ys [trips, B, n]; a carried
    sum of the h_i is the loop's other output."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph([
        helper.make_node("Cast", ["i"], ["i_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["i_float", "one"], ["factor"]),
        helper.make_node("Mul", ["x", "factor"], ["h"]),
        helper.make_node("Gemm", ["h", "W", "C"], ["y_i"], transB=1, name="fc_loop"),
        helper.make_node("Add", ["total_in", "h"], ["total_out"]),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ], "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _floats("total_in", ["B", f])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _floats("total_out", ["B", f]),
         _floats("y_i", ["B", n])])
    inits = [numpy_helper.from_array(rng.standard_normal((n, f)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(trips, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "true")]
    nodes = [helper.make_node("Sub", ["x", "x"], ["zero_total"]),
             helper.make_node("Loop", ["trips", "true", "zero_total"], ["total", "ys"], body=body, name="loop")]
    return _model(nodes, [_floats("x", ["B", f])], [_floats("ys", [trips, "B", n]), _floats("total", ["B", f])],
                  inits)


def scan_model(f=6, n=5, seed=0) -> onnx.ModelProto:
    """xs [T, B, f] -> Scan over T: Gemm 'fc_scan'(x_t, W) -> y_t, stacked ys [T, B, n]."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph([helper.make_node("Gemm", ["x_t", "W"], ["y_t"], transB=1, name="fc_scan")], "body",
                             [_floats("x_t", ["B", f])], [_floats("y_t", ["B", n])])
    inits = [numpy_helper.from_array(rng.standard_normal((n, f)).astype(np.float32), "W")]
    nodes = [helper.make_node("Scan", ["xs"], ["ys"], body=body, num_scan_inputs=1, name="scan")]
    return _model(nodes, [_floats("xs", ["T", "B", f])], [_floats("ys", ["T", "B", n])], inits)


def if_in_loop_model(f=6, n=5, trips=4, seed=0) -> onnx.ModelProto:
    """x [B, f]; Loop of ``trips`` iterations, iteration i: h_i = x * (i + 1), then If(i is even):
    Gemm 'fc_even'(h_i, W1, C1), else MatMul 'fc_odd'(h_i, W2) + b2 -> y_i, stacked as ys
    [trips, B, n]. The branch taken changes between iterations, so each branch's input exists in
    every other iteration only."""
    rng = np.random.default_rng(seed)
    even = helper.make_graph([helper.make_node("Gemm", ["h", "W1", "C1"], ["y_even"], transB=1, name="fc_even")],
                             "even", [], [_floats("y_even", ["B", n])])
    odd = helper.make_graph([helper.make_node("MatMul", ["h", "W2"], ["p_odd"], name="fc_odd"),
                             helper.make_node("Add", ["p_odd", "b2"], ["y_odd"], name="bias_odd")],
                            "odd", [], [_floats("y_odd", ["B", n])])
    body = helper.make_graph([
        helper.make_node("Cast", ["i"], ["i_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["i_float", "one"], ["factor"]),
        helper.make_node("Mul", ["x", "factor"], ["h"]),
        helper.make_node("Mod", ["i", "two"], ["parity"]),
        helper.make_node("Equal", ["parity", "zero"], ["is_even"]),
        helper.make_node("If", ["is_even"], ["y_i"], then_branch=even, else_branch=odd, name="parity_if"),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ], "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _floats("y_i", ["B", n])])
    inits = [numpy_helper.from_array(rng.standard_normal((n, f)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C1"),
             numpy_helper.from_array(rng.standard_normal((f, n)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(2, np.int64), "two"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(trips, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "true")]
    nodes = [helper.make_node("Loop", ["trips", "true"], ["ys"], body=body, name="loop")]
    return _model(nodes, [_floats("x", ["B", f])], [_floats("ys", [trips, "B", n])], inits)


def if_in_scan_model(f=6, seed=0) -> onnx.ModelProto:
    """xs [T, B, f] -> Scan over T, step t: If(sum of x_t > 0) Gemm 'fc_pos'(x_t, W [f, f]), else
    x_t itself -> y_t, stacked ys [T, B, f]: the branch taken may change between steps."""
    n = f
    rng = np.random.default_rng(seed)
    pos = helper.make_graph([helper.make_node("Gemm", ["x_t", "W"], ["y_pos"], transB=1, name="fc_pos")],
                            "pos", [], [_floats("y_pos", ["B", n])])
    neg = helper.make_graph([helper.make_node("Identity", ["x_t"], ["y_neg"], name="copy")],
                            "neg", [], [_floats("y_neg", ["B", f])])
    body = helper.make_graph([
        helper.make_node("ReduceSum", ["x_t"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y_t"], then_branch=pos, else_branch=neg, name="sign_if"),
    ], "body", [_floats("x_t", ["B", f])], [_floats("y_t", ["B", n])])
    inits = [numpy_helper.from_array(rng.standard_normal((n, f)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("Scan", ["xs"], ["ys"], body=body, num_scan_inputs=1, name="scan")]
    return _model(nodes, [_floats("xs", ["T", "B", f])], [_floats("ys", ["T", "B", n])], inits)


def masked_model(f=8, n=6, classes=3, seed=0, time_major=False, mask="attention_mask",
                 per_position=False) -> onnx.ModelProto:
    """A sequence encoder as tokenizers feed it: x [B, S, f] with attention_mask [B, S] (0 at a
    pad) -> MatMul + Add ("positions", per position) -> Relu -> times the mask -> sum over S ->
    Gemm ("pooled", per sample): padded positions never reach the output. ``time_major``: the
    MatMul runs on x transposed to [S, B, f] (nn.MultiheadAttention's default layout); ``mask``:
    the mask input's name; ``per_position``: the output is the Relu's [B, S, n], scores per
    position as a token classifier's (the pads' rows computed, and ignored by its user)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((f, n)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((classes, n)).astype(np.float32), "V"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.array([1], np.int64), "sequence")]
    nodes = [helper.make_node("MatMul", ["xt" if time_major else "x", "W"], ["h"], name="positions"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="positions_bias"),
             helper.make_node("Relu", ["hb"], ["rt" if time_major else "r"], name="relu"),
             helper.make_node("Cast", [mask], ["m"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Unsqueeze", ["m", "last"], ["m3"], name="unsqueeze"),
             helper.make_node("Mul", ["r", "m3"], ["kept"], name="mask"),
             helper.make_node("ReduceSum", ["kept", "sequence"], ["pooled"], keepdims=0, name="pool"),
             helper.make_node("Gemm", ["pooled", "V"], ["y"], transB=1, name="pooled_dense")]
    if time_major:
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time_major"), *nodes[:3],
                 helper.make_node("Transpose", ["rt"], ["r"], perm=[1, 0, 2], name="to_batch_major"), *nodes[3:]]
    inputs = [_floats("x", ["B", "S", f]), helper.make_tensor_value_info(mask, TensorProto.INT64, ["B", "S"])]
    if per_position:
        return _model(nodes[:3], inputs, [_floats("r", ["B", "S", n])], inits[:2])
    return _model(nodes, inputs, [_floats("y", ["B", classes])], inits)
