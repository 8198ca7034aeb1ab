"""LSTM and RNN nodes end to end: the cost the report states (the QUBO energy over the Gram of
[x_t; h_(t-1)]) equals the gate pre-activation error computed by an independent numpy cell on
the dequantized weights onnxruntime reads back, summed over gates and directions and averaged
over the steps each sample runs; the written model equals that numpy cell and is the same at
onnxruntime's default and basic levels as with optimizations disabled. GRU and what no form
can quantize exactly are skipped with their reason."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from runs import quantize

from onnx_qubo.core.errors import ModelError
from onnx_qubo.core.views import RecurrentCell
from onnx_qubo.model.discovery import find_dense_layers
from onnx_qubo.pipeline import find_layers

LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          ort.GraphOptimizationLevel.ORT_DISABLE_ALL]
GATES = {"LSTM": 4, "RNN": 1, "GRU": 3}
BATCH, STEPS, INPUT, HIDDEN = 24, 6, 5, 4


def recurrent_model(op="LSTM", direction="bidirectional", layout=0, sequence_lens=False, initial_h=None,
                    bias=True, peepholes=False, named_y=True, before=False, after=False, seed=0, **attributes):
    """Graph inputs are batch-major: x [B, T, I] (sequence_lens [B], h0 [B, D, H]), transposed
    to the node's layout; Y (or Y_h) as the output, after an optional MatMul before the node
    (``before``) and one after it (``after``). ``initial_h``: None, "input" or "constant"."""
    rng = np.random.default_rng(seed)
    d, g = 2 if direction == "bidirectional" else 1, GATES[op]
    inits = [numpy_helper.from_array(rng.standard_normal((d, g * HIDDEN, INPUT)).astype(np.float32) / 2, "W"),
             numpy_helper.from_array(rng.standard_normal((d, g * HIDDEN, HIDDEN)).astype(np.float32) / 2, "R")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", STEPS, INPUT])]
    nodes = []
    x = "x"
    if before:
        inits.append(numpy_helper.from_array(rng.standard_normal((INPUT, INPUT)).astype(np.float32), "M"))
        nodes.append(helper.make_node("MatMul", ["x", "M"], ["xm"], name="before"))
        x = "xm"
    if layout == 0:
        nodes.append(helper.make_node("Transpose", [x], ["xt"], perm=[1, 0, 2]))
        x = "xt"
    cell_inputs = [x, "W", "R", "", "", ""]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal((d, 2 * g * HIDDEN)).astype(np.float32), "Bias"))
        cell_inputs[3] = "Bias"
    if sequence_lens:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["B"]))
        cell_inputs[4] = "lens"
    if initial_h == "input":
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["B", d, HIDDEN]))
        cell_inputs[5] = "h0"
        if layout == 0:
            nodes.append(helper.make_node("Transpose", ["h0"], ["h0t"], perm=[1, 0, 2]))
            cell_inputs[5] = "h0t"
    elif initial_h == "constant":
        shape = (BATCH, d, HIDDEN) if layout else (d, BATCH, HIDDEN)
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "h0c"))
        cell_inputs[5] = "h0c"
    if peepholes:
        inits.append(numpy_helper.from_array(rng.standard_normal((d, 3 * HIDDEN)).astype(np.float32), "P"))
        cell_inputs += ["", "P"]
    while cell_inputs and not cell_inputs[-1]:
        cell_inputs.pop()
    outputs = ["y", ""] if named_y else ["", "yh"]
    nodes.append(helper.make_node(op, cell_inputs, outputs, name="cell", direction=direction, hidden_size=HIDDEN,
                                  **({"layout": layout} if layout else {}), **attributes))
    out_shape = [BATCH, STEPS, d, HIDDEN] if layout else [STEPS, d, BATCH, HIDDEN]
    result = "y" if named_y else "yh"
    if not named_y:
        out_shape = [BATCH, d, HIDDEN] if layout else [d, BATCH, HIDDEN]
    if after:
        inits.append(numpy_helper.from_array(rng.standard_normal((HIDDEN, 3)).astype(np.float32), "N"))
        nodes.append(helper.make_node("MatMul", [result, "N"], ["z"], name="after"))
        result, out_shape = "z", out_shape[:-1] + [3]
    out_shape[0 if layout else 2 if named_y else 1] = "B"
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(result, TensorProto.FLOAT, out_shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    names = {i.name for i in model.graph.input}
    feed = {"x": rng.standard_normal((BATCH, STEPS, INPUT)).astype(np.float32)}
    if "lens" in names:
        feed["lens"] = rng.integers(0, STEPS + 1, BATCH).astype(np.int32)
        feed["lens"][0] = STEPS
    if "h0" in names:
        d = next(i for i in model.graph.input if i.name == "h0").type.tensor_type.shape.dim[1].dim_value
        feed["h0"] = rng.standard_normal((BATCH, d, HIDDEN)).astype(np.float32)
    return feed


def session(model, level=LEVELS[0], outputs=()):
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])


def cell_node(model):
    return next(n for n in model.graph.node if n.op_type in GATES)


def cell_weights(model):
    """W, R, B (float64) as the model's recurrent node reads them, dequantized by onnxruntime."""
    node = cell_node(model)
    names = (list(node.input[1:4]) + [""])[:3]
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    computed = [n for n in names if n and n not in consts]
    values = dict(zip(computed, session(model, LEVELS[-1], computed).run(computed, feeds(model)) if computed else []))
    values.update(consts)
    return [None if not n else values[n].astype(np.float64) for n in names]


def activation(name, v):
    return {"Sigmoid": lambda a: 1 / (1 + np.exp(-a)), "Tanh": np.tanh, "Relu": lambda a: np.maximum(a, 0)}[name](v)


def numpy_cell(model, feed, w, r, b):
    """An independent ONNX LSTM/RNN (spec equations, batch-major I/O): per direction, the gate
    pre-activations' W x_t + R h_(t-1) inputs of each step run, and Y [B, T, D, H]."""
    node = cell_node(model)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op, d = node.op_type, len(w)
    names = [a.decode() for a in attrs.get("activations", [])] or {"LSTM": ["Sigmoid", "Tanh", "Tanh"],
                                                                   "RNN": ["Tanh"]}[op] * d
    clip = attrs.get("clip")

    def cut(v):  # clip applies to each activation's input, peephole terms included
        return v if clip is None else np.clip(v, -clip, clip)
    x = feed["x"].astype(np.float64)
    if any(n.name == "before" for n in model.graph.node):
        x = x @ numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "M")).astype(np.float64)
    lens = feed.get("lens", np.full(BATCH, STEPS))
    h0 = np.zeros((BATCH, d, HIDDEN))
    consts = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    if "h0" in feed:
        h0 = feed["h0"].astype(np.float64)
    elif "h0c" in consts:
        h0 = consts["h0c"] if attrs.get("layout") else consts["h0c"].transpose(1, 0, 2)
    p = consts.get("P", np.zeros((d, 3 * HIDDEN)))
    bias = np.zeros((d, 2 * len(w[0]))) if b is None else b
    y = np.zeros((BATCH, STEPS, d, HIDDEN))
    gate_inputs = [[] for _ in range(d)]  # per direction: (x_t, h_(t-1)) of each step run
    for k in range(d):
        reverse = attrs.get("direction", b"forward") == b"reverse" or k == 1
        f, g, h = (names[3 * k:3 * k + 3] if op == "LSTM" else names[k:k + 1] * 3)
        for s in range(BATCH):
            hid, c = h0[s, k].copy(), np.zeros(HIDDEN)
            order = range(lens[s] - 1, -1, -1) if reverse else range(lens[s])
            for t in order:
                gate_inputs[k].append((t, s, x[s, t], hid.copy()))
                pre = w[k] @ x[s, t] + r[k] @ hid + bias[k, :len(w[0])] + bias[k, len(w[0]):]
                if op == "RNN":
                    hid = activation(f, cut(pre))
                else:
                    i_, o_, f_, c_ = np.split(pre, 4)
                    pi, po, pf = np.split(p[k], 3)
                    c = activation(f, cut(f_ + pf * c)) * c + activation(f, cut(i_ + pi * c)) * activation(g, cut(c_))
                    hid = activation(f, cut(o_ + po * c)) * activation(h, c)
                y[s, t, k] = hid
    return gate_inputs, y


def gate_error(gate_inputs, w, r, w_q, r_q, db=None):
    """E over the steps run of sum over gates and directions of the squared pre-activation error."""
    total = 0.0
    for k, steps in enumerate(gate_inputs):
        for _, _, x_t, h_prev in steps:
            e = (w_q[k] - w[k]) @ x_t + (r_q[k] - r[k]) @ h_prev + (0 if db is None else db[k])
            total += e @ e
    return total / len(gate_inputs[0])


def output_y(model, feed, level=LEVELS[0]):
    """The node's Y, batch-major [B, T, D, H]."""
    node = cell_node(model)
    y = session(model, level, [node.output[0]] if node.output[0] not in {o.name for o in model.graph.output} else [])
    out = y.run([node.output[0]], feed)[0]
    return out if any(a.name == "layout" and a.i for a in node.attribute) else out.transpose(2, 0, 1, 3)


MODELS = {
    "lstm-bidirectional": lambda: recurrent_model(),
    "lstm-lens-initial": lambda: recurrent_model(sequence_lens=True, initial_h="input"),
    "lstm-reverse-peepholes-clip": lambda: recurrent_model(direction="reverse", peepholes=True, clip=0.8,
                                                           initial_h="constant"),
    "lstm-forward-relu-no-bias": lambda: recurrent_model(direction="forward", bias=False,
                                                         activations=["Sigmoid", "Relu", "Tanh"]),
    "rnn-bidirectional-lens": lambda: recurrent_model("RNN", sequence_lens=True),
}
SCHEMES = {
    "int4-channel": dict(bits=4),
    "int3-block-across-w-r": dict(bits=3, granularity="block", block_size=4, symmetric=False),  # f=9: [4,5) spans
    "int2-tensor": dict(bits=2, granularity="tensor"),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.slow
def test_cost_is_the_gate_preactivation_error_of_an_independent_cell(model_name, scheme, tmp_path):
    model = MODELS[model_name]()
    feed = feeds(model)
    report = quantize(model, tmp_path / "q.onnx", calibration=feed, batch_size=BATCH, speed=False, **SCHEMES[scheme])
    layer = find_dense_layers(model)[0][0]
    assert [(row.name, row.form, row.n_out, row.f_in) for row in report.layers] == [
        ("cell", layer.label, len(layer.weight), INPUT + HIDDEN)]
    w, r, b = cell_weights(model)
    gate_inputs, y = numpy_cell(model, feed, w, r, b)
    np.testing.assert_allclose(output_y(model, feed), y, atol=1e-5)  # the reference is ONNX's cell
    quantized = onnx.load(tmp_path / "q.onnx")
    w_q, r_q, b_q = cell_weights(quantized)
    assert not np.allclose(w_q, w) and not np.allclose(r_q, r)
    np.testing.assert_array_equal(b_q, b)  # the bias stays float
    assert report.layers[0].cost_solved == pytest.approx(gate_error(gate_inputs, w, r, w_q, r_q), rel=1e-4)
    assert report.layers[0].cost_solved <= report.layers[0].cost_rtn * (1 + 1e-9)
    _, y_q = numpy_cell(quantized, feed, w_q, r_q, b_q)
    for level in LEVELS:
        np.testing.assert_allclose(output_y(quantized, feed, level), y_q, atol=1e-5)


@pytest.mark.parametrize("model_name", ["lstm-bidirectional", "lstm-lens-initial"])
@pytest.mark.slow
def test_bias_correction_goes_into_the_bias_and_is_measured(model_name, tmp_path):
    model = MODELS[model_name]()
    feed = feeds(model)
    report = quantize(model, tmp_path / "q.onnx", bits=2, calibration=feed, batch_size=BATCH, bias_correction=True,
                      speed=False)
    quantized = onnx.load(tmp_path / "q.onnx")
    assert [n.op_type for n in quantized.graph.node].count("Add") == 1  # into B, nothing after Y
    w, r, b = cell_weights(model)
    w_q, r_q, b_q = cell_weights(quantized)
    gate_inputs, _ = numpy_cell(model, feed, w, r, b)
    rows = len(w[0])
    np.testing.assert_array_equal(b_q[:, rows:], b[:, rows:])  # R's half untouched
    corrected = gate_error(gate_inputs, w, r, w_q, r_q, b_q[:, :rows] - b[:, :rows])
    assert report.layers[0].cost_bias_corrected == pytest.approx(corrected, rel=1e-4, abs=1e-9)
    assert corrected < gate_error(gate_inputs, w, r, w_q, r_q)
    _, y_q = numpy_cell(quantized, feed, w_q, r_q, b_q)
    for level in LEVELS:
        np.testing.assert_allclose(output_y(quantized, feed, level), y_q, atol=1e-5)


@pytest.mark.slow
def test_sequential_after_a_quantized_layer_targets_the_float_gates(tmp_path):
    model = recurrent_model(before=True, sequence_lens=True)
    feed = feeds(model)
    report = quantize(model, tmp_path / "q.onnx", bits=2, calibration=feed, batch_size=BATCH, sequential=True,
                      speed=False)
    assert [row.name for row in report.layers] == ["before", "cell"]
    quantized = onnx.load(tmp_path / "q.onnx")
    w, r, b = cell_weights(model)
    w_q, r_q, _ = cell_weights(quantized)
    floats, _ = numpy_cell(model, feed, w, r, b)
    partly = onnx.ModelProto()  # the float cell after the quantized MatMul: what the quantized cell is tuned on
    partly.CopyFrom(model)
    m_q = session(quantized, LEVELS[-1], [n.input[1] for n in quantized.graph.node if n.name == "before"])
    partly.graph.initializer.remove(next(i for i in partly.graph.initializer if i.name == "M"))
    partly.graph.initializer.append(numpy_helper.from_array(m_q.run(None, feed)[-1].T, "M"))  # Gemm(transB)
    seen, _ = numpy_cell(partly, feed, w, r, b)
    error = 0.0
    for k in range(len(w)):
        for (_, _, x, h), (_, _, x_s, h_s) in zip(floats[k], seen[k]):
            e = w_q[k] @ x_s + r_q[k] @ h_s - w[k] @ x - r[k] @ h
            error += e @ e
    assert report.layers[1].cost_solved == pytest.approx(error / len(floats[0]), rel=1e-4)


@pytest.mark.slow
def test_a_node_without_y_is_calibrated_through_a_named_copy(tmp_path):
    """... and, sequential, the layer after the cell is tuned on the quantized cell's output: its
    cost is the whole model's output error."""
    model = recurrent_model(named_y=False, after=True)
    feed = feeds(model)
    report = quantize(model, tmp_path / "q.onnx", bits=3, calibration=feed, batch_size=BATCH, sequential=True,
                      speed=False)
    assert [row.name for row in report.layers] == ["cell", "after"]
    quantized = onnx.load(tmp_path / "q.onnx")
    y_float, y_quant = (session(m).run(None, feed)[0].astype(np.float64) for m in (model, quantized))
    assert report.layers[1].cost_solved == pytest.approx(((y_quant - y_float) ** 2).sum(axis=-1).mean(), rel=1e-4)
    assert cell_node(model).output[0] == ""  # the input model untouched
    assert cell_node(quantized).output[0] == ""  # nor is Y added to the written model
    w, r, b = cell_weights(model)
    w_q, r_q, _ = cell_weights(quantized)
    gate_inputs, _ = numpy_cell(model, feed, w, r, b)
    assert report.layers[0].cost_solved == pytest.approx(gate_error(gate_inputs, w, r, w_q, r_q), rel=1e-4)


@pytest.mark.slow
def test_quantized_inputs_are_quantized_before_the_cell(tmp_path):
    model = recurrent_model(direction="forward")
    feed = feeds(model)
    report = quantize(model, tmp_path / "q.onnx", bits=4, calibration=feed, batch_size=BATCH, activations="uint8",
                      speed=False)
    quantized = onnx.load(tmp_path / "q.onnx")
    node = cell_node(quantized)
    x_q = session(quantized, LEVELS[-1], [node.input[0]]).run([node.input[0]], feed)[0].transpose(1, 0, 2)
    assert not np.allclose(x_q, feed["x"])
    w, r, b = cell_weights(model)
    w_q, r_q, _ = cell_weights(quantized)
    gate_inputs, _ = numpy_cell(model, feed, w, r, b)
    error = sum(float(np.sum((w_q[0] @ x_q[s, t] + r_q[0] @ h - w[0] @ x - r[0] @ h) ** 2))
                for t, s, x, h in gate_inputs[0]) / len(gate_inputs[0])
    assert report.layers[0].cost_solved == pytest.approx(error, rel=1e-4)


@pytest.mark.slow
def test_format_ort_keeps_the_portable_form(tmp_path):
    model = recurrent_model()
    report = quantize(model, tmp_path / "q.onnx", bits=4, calibration=feeds(model), batch_size=BATCH, format="ort",
                      speed=False)
    assert report.layers[0].kernel == "DequantizeLinear"
    assert "no faster onnxruntime kernel" in report.layers[0].kernel_fallback


@pytest.mark.slow
def test_per_direction_problems_and_layer_bits_by_the_node_name(tmp_path):
    model = recurrent_model()
    report = quantize(model, tmp_path / "q.onnx", bits=2, calibration=feeds(model), batch_size=BATCH,
                      layer_bits={"cell": 5}, dump_qubo=tmp_path / "dump", speed=False)
    assert [(row.name, row.bits, row.n_out) for row in report.layers] == [("cell", 5, 2 * 4 * HIDDEN)]
    index = json.loads((tmp_path / "dump" / "index.json").read_text())
    assert [(entry["layer"], entry["n_out"], entry["bits"]) for entry in index] == [
        (f"cell[{d}]", 4 * HIDDEN, 5) for d in range(2)]  # a QUBO file per direction


def skip_reason(model):
    layers, skipped = find_dense_layers(model)
    assert not layers
    return {s.name: s.reason for s in skipped}["cell"]


def test_gru_is_skipped_with_its_reason():
    assert "candidate gate reads r_t * h_(t-1)" in skip_reason(recurrent_model("GRU"))
    with pytest.raises(ModelError, match="candidate gate"):
        find_layers(recurrent_model("GRU"))


def test_weights_that_are_not_constants_are_skipped():
    model = recurrent_model()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [2, 16, INPUT]))
    assert "callers can override" in skip_reason(model)
    model = recurrent_model()
    init = next(i for i in model.graph.initializer if i.name == "R")
    model.graph.node.insert(0, helper.make_node("Identity", ["R0"], ["R"]))
    init.name = "R0"
    assert "'R' is not a constant initializer" in skip_reason(model)


def test_an_overridable_initial_state_and_a_wrong_hidden_size_are_skipped():
    model = recurrent_model(initial_h="constant")
    model.graph.input.append(helper.make_tensor_value_info("h0c", TensorProto.FLOAT, [2, BATCH, HIDDEN]))
    assert "'h0c' is an initializer callers can override" in skip_reason(model)
    model = recurrent_model()
    next(a for a in cell_node(model).attribute if a.name == "hidden_size").i = HIDDEN + 1
    assert "hidden_size=5 differs from R's 4" in skip_reason(model)


def test_batch_major_layout_reads_the_same_gate_inputs(tmp_path):
    """onnxruntime runs no layout=1 node (calibration says so: a ModelError), but the gate inputs
    are read the same from either layout."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((STEPS, BATCH, INPUT)), rng.standard_normal((STEPS, 2, BATCH, HIDDEN))
    h0, lens = rng.standard_normal((2, BATCH, HIDDEN)), rng.integers(0, STEPS + 1, BATCH)
    cells = [RecurrentCell("LSTM", (False, True), INPUT, HIDDEN, layout, "Y", True, "h0", "lens") for layout in (0, 1)]
    time_major = cells[0].gate_inputs(x, {"Y": y, "h0": h0, "lens": lens})
    batch_major = cells[1].gate_inputs(x.transpose(1, 0, 2), {"Y": y.transpose(2, 0, 1, 3),
                                                              "h0": h0.transpose(1, 0, 2), "lens": lens})
    np.testing.assert_array_equal(batch_major, time_major)
    assert time_major.shape == (2, lens.sum(), INPUT + HIDDEN)
    last = np.flatnonzero(lens == STEPS)[0]  # a sample that runs every step: its reverse starts from h0
    rows = np.flatnonzero(np.all(time_major[1, :, :INPUT] == x[STEPS - 1, last], axis=1))
    np.testing.assert_array_equal(time_major[1, rows[0], INPUT:], h0[1, last])
    model = recurrent_model(layout=1)
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        quantize(model, tmp_path / "q.onnx", bits=4, calibration=feeds(model), batch_size=BATCH, speed=False)
