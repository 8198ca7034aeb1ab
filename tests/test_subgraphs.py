"""Dense layers inside If branches and Loop/Scan bodies: discovered, calibrated on the rows of
the runs where their body ran (every iteration of a loop), rewritten where they live. The cost
the report states equals the layer's output error measured in onnxruntime, and the written model
equals, at onnxruntime's default and basic levels, the same model with every DequantizeLinear
replaced by numpy's dequantization of the integers read back, run with optimizations disabled."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from runs import quantize

from onnx_qubo.core.errors import ModelError
from onnx_qubo.graph.subgraphs import Exposed, all_graphs, expose, keep_only
from onnx_qubo.model.discovery import fed_by_earlier, find_dense_layers
from onnx_qubo.pipeline import prepare

from graphs import if_in_loop_model, if_in_scan_model, if_model, loop_model, scan_model

DEFAULT, BASIC, NONE = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                        ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
RNG = np.random.default_rng(7)
X = RNG.standard_normal((40, 6)).astype(np.float32)


def run(model, feed, level=DEFAULT):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [y.astype(np.float64) for y in session.run(None, feed)]


def error(float_model, quantized, feeds, output=0):
    """Squared output error summed over the last axis, averaged over all rows of all feeds."""
    diffs = [(run(quantized, f)[output] - run(float_model, f)[output]).reshape(-1, 5) for f in feeds]
    return float((np.concatenate(diffs) ** 2).sum(axis=1).mean())


def dequantized_reference(model):
    """``model`` with each DequantizeLinear (in any graph) replaced by a Constant holding numpy's
    ``(q - zero_point) * scale`` of the integers read back from the main graph."""
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    values = {init.name: numpy_helper.to_array(init) for init in reference.graph.initializer}
    for graph in reversed(all_graphs(reference.graph)):
        nodes = []
        for node in graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in values:
                nodes.append(node)
                continue
            q, scale = values[node.input[0]].astype(np.float64), values[node.input[1]].astype(np.float64)
            zero = values[node.input[2]].astype(np.float64) if len(node.input) > 2 else np.zeros_like(scale)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("block_size"):
                scale, zero = (np.repeat(v, attrs["block_size"], axis=1)[:, :q.shape[1]] for v in (scale, zero))
            elif scale.ndim == 1:
                scale, zero = scale[:, None], zero[:, None]
            value = ((q - zero) * scale).astype(np.float32)
            nodes.append(helper.make_node("Constant", [], [node.output[0]], value=numpy_helper.from_array(value)))
        del graph.node[:]
        graph.node.extend(nodes)
    return reference


def assert_exact(written, feeds):
    reference = dequantized_reference(written)
    stored = {init.name for init in reference.graph.initializer}
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in stored  # weights and biases replaced
                   for g in all_graphs(reference.graph) for n in g.node)
    for feed in feeds:
        expected = run(reference, feed, NONE)
        for level in (DEFAULT, BASIC):
            for got, want in zip(run(written, feed, level), expected):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layers_in_bodies_are_found_named_by_their_holder_and_excludable(tmp_path):
    model = prepare(if_model())
    assert [layer.name for layer in find_dense_layers(model)[0]] == [
        "pre", "branch/else_branch/fc_else", "branch/then_branch/fc_then"]
    assert [layer.name for layer in find_dense_layers(prepare(loop_model()))[0]] == ["loop/body/fc_loop"]
    report = quantize(if_model(), tmp_path / "q.onnx", calibration={"x_in": X, "cond": np.array(True)},
                      exclude=["branch/then_branch/fc_then"], solver="rtn", speed=False)
    assert [layer.name for layer in report.layers] == ["pre"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["branch/then_branch/fc_then"] == "excluded on request"
    assert reasons["branch/else_branch/fc_else"].startswith("never ran on the calibration data")


@pytest.mark.parametrize("cond", [True, False])
@pytest.mark.slow
def test_if_cost_is_the_taken_branch_error_and_the_other_branch_is_skipped(cond, tmp_path):
    model = if_model()
    data = {"x_in": X, "cond": np.array(cond)}
    report = quantize(model, tmp_path / "q.onnx", calibration=data, bits=3, exclude=["pre"], batch_size=16,
                      speed=False)
    taken, other = ("then", "else") if cond else ("else", "then")
    assert [layer.name for layer in report.layers] == [f"branch/{taken}_branch/fc_{taken}"]
    assert [s.name for s in report.skipped if "never ran" in s.reason] == [f"branch/{other}_branch/fc_{other}"]
    written = onnx.load(tmp_path / "q.onnx")
    assert report.layers[0].final_cost == pytest.approx(error(model, written, [data]), rel=1e-4)
    assert report.layers[0].cost_solved <= report.layers[0].cost_rtn * (1 + 1e-9)


class Feeds:
    """A CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


@pytest.mark.slow
def test_each_branch_is_calibrated_on_the_batches_that_took_it(tmp_path):
    model = if_model()
    feeds = [{"x_in": X[k:k + 10], "cond": np.array(k % 20 == 0)} for k in range(0, 40, 10)]
    report = quantize(model, tmp_path / "q.onnx", calibration=Feeds(feeds), evaluation=Feeds(feeds), bits=2,
                      exclude=["pre"], speed=False)
    assert {layer.name for layer in report.layers} == {"branch/then_branch/fc_then", "branch/else_branch/fc_else"}
    written = onnx.load(tmp_path / "q.onnx")
    costs = {layer.name: layer.final_cost for layer in report.layers}
    assert costs["branch/then_branch/fc_then"] == pytest.approx(error(model, written, feeds[0::2]), rel=1e-4)
    assert costs["branch/else_branch/fc_else"] == pytest.approx(error(model, written, feeds[1::2]), rel=1e-4)


@pytest.mark.parametrize("builder, feed", [(loop_model, {"x": X}),
                                           (scan_model, {"xs": RNG.standard_normal((4, 10, 6)).astype(np.float32)})])
@pytest.mark.slow
def test_loop_and_scan_cost_is_the_error_over_every_iteration(builder, feed, tmp_path):
    model = builder()
    report = quantize(model, tmp_path / "q.onnx", calibration=feed, bits=2, batch_size=16, speed=False)
    written = onnx.load(tmp_path / "q.onnx")
    rows = feed.get("x", feed.get("xs")).size // 6 * (3 if builder is loop_model else 1)
    assert report.calibration_samples * (3 if builder is loop_model else 10) == rows
    assert report.layers[0].final_cost == pytest.approx(error(model, written, [feed]), rel=1e-4)


SCHEMES = {
    "int4-channel": dict(bits=4),
    "int2-block-asymmetric": dict(bits=2, granularity="block", block_size=4, symmetric=False),
    "int4-bias-quantize-inputs-uint8": dict(bits=4, bias="quantize", activations="uint8"),
    "int4-format-ort": dict(bits=4, format="ort"),
}
MODELS = {
    "if": (if_model, [{"x_in": X, "cond": np.array(c)} for c in (True, False)]),
    "loop": (loop_model, [{"x": X}]),
    "scan": (scan_model, [{"xs": RNG.standard_normal((3, 8, 6)).astype(np.float32)}]),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow
def test_the_rewrite_in_bodies_equals_numpy_dequantization(name, scheme, tmp_path):
    builder, feeds = MODELS[name]
    model = builder()
    before = model.SerializeToString()
    calibration = Feeds(feeds) if name == "if" else feeds[0]
    quantize(model, tmp_path / "q.onnx", calibration=calibration, evaluation=feeds[0], speed=False,
             **SCHEMES[scheme])
    assert model.SerializeToString() == before
    written = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(written, full_check=True)
    bodies = all_graphs(written.graph)[1:]
    assert all(not any(i.name.endswith("_quantized") for i in body.initializer) for body in bodies)
    kernels = {"DequantizeLinear", "MatMulNBits", "MatMulIntegerToFloat"}
    assert any(n.op_type in kernels for body in bodies for n in body.node)  # the layer is rewritten in its body
    assert_exact(written, feeds)


@pytest.mark.slow
def test_sequential_recalibrates_the_layers_a_quantized_layer_feeds_through_an_if(tmp_path):
    model = prepare(if_model())
    layers, _ = find_dense_layers(model)
    assert fed_by_earlier(model, layers) == [False, True, True]
    data = {"x_in": X, "cond": np.array(True)}
    plain = quantize(if_model(), tmp_path / "a.onnx", calibration=data, bits=2, speed=False)
    sequential = quantize(if_model(), tmp_path / "b.onnx", calibration=data, bits=2, sequential=True, speed=False)
    assert plain.layers[0].cost_solved == sequential.layers[0].cost_solved
    assert plain.layers[1].cost_solved != sequential.layers[1].cost_solved  # its input is the quantized pre's
    assert not [note for note in sequential.notes if "sequential" in note]  # it did change something


def test_expose_routes_body_tensors_out_and_leaves_the_model_untouched():
    model = prepare(if_model())
    before = model.SerializeToString()
    exposed, where = expose(model, ["x_in_fc_then", "x_in_fc_else", "x"])
    assert model.SerializeToString() == before
    assert where["x"].output == "x" and where["x_in_fc_then"].levels == 0
    outputs = dict(zip([o.name for o in exposed.graph.output], run(exposed, {"x_in": X, "cond": np.array(True)})))
    np.testing.assert_allclose(outputs[where["x_in_fc_then"].output], outputs["x"])
    assert outputs[where["x_in_fc_else"].output].size == 0  # the branch that did not run
    loop = prepare(loop_model())
    exposed, where = expose(loop, ["h"])
    stacked = run(exposed, {"x": X})[-1]
    assert stacked.shape == (3, 40, 6) and where["h"].rows(stacked).shape == (120, 6)
    np.testing.assert_allclose(where["h"].rows(stacked)[40:80], 2 * X, rtol=1e-6)
    with pytest.raises(ValueError, match="not in the model"):
        expose(model, ["nowhere"])


def test_keep_only_cuts_the_model_to_what_the_outputs_need():
    """The cut model computes the asked outputs as the whole one does, from the same feed (an input
    it no longer reads included); an If's reads of the main graph keep their producers."""
    model = prepare(if_model())
    feed = {"x_in": X, "cond": np.array(True)}
    exposed, where = expose(model, ["x", "x_in_fc_then"])
    whole = dict(zip([o.name for o in exposed.graph.output], run(exposed, feed)))
    keep_only(exposed, [where["x"].output])
    assert [n.op_type for n in exposed.graph.node] == ["Gemm", "Tanh"]
    np.testing.assert_array_equal(run(exposed, feed)[0], whole[where["x"].output])
    branch, where = expose(model, ["x_in_fc_then"])
    keep_only(branch, [where["x_in_fc_then"].output])
    assert [n.op_type for n in branch.graph.node] == ["Gemm", "Tanh", "If"]  # the branch reads x
    np.testing.assert_array_equal(run(branch, feed)[0], whole[where["x_in_fc_then"].output])


@pytest.mark.slow
def test_an_if_whose_branch_changes_between_loop_iterations_calibrates_each_branch_on_its_iterations(tmp_path):
    model = if_in_loop_model(trips=4)
    report = quantize(model, tmp_path / "q.onnx", calibration={"x": X}, bits=2, batch_size=16, speed=False)
    assert {layer.name for layer in report.layers} == {"loop/body/parity_if/then_branch/fc_even",
                                                        "loop/body/parity_if/else_branch/fc_odd"}
    written = onnx.load(tmp_path / "q.onnx")
    diff = run(written, {"x": X})[0] - run(model, {"x": X})[0]  # [trips, B, n]
    costs = {layer.name.rsplit("/", 1)[1]: layer.final_cost for layer in report.layers}
    for name, iterations in (("fc_even", diff[0::2]), ("fc_odd", diff[1::2])):
        assert costs[name] == pytest.approx(float((iterations.reshape(-1, 5) ** 2).sum(axis=1).mean()), rel=1e-4)


def test_expose_packs_a_tensor_of_an_if_inside_a_loop():
    model = prepare(if_in_loop_model(trips=4))
    exposed, where = expose(model, ["h_in_fc_even", "h_in_fc_odd"])
    outputs = dict(zip([o.name for o in exposed.graph.output], run(exposed, {"x": X})))
    even, odd = (where[name].rows(*(outputs[o] for o in where[name].outputs))
                 for name in ("h_in_fc_even", "h_in_fc_odd"))
    np.testing.assert_allclose(even, np.concatenate([X, 3 * X]), rtol=1e-6)
    np.testing.assert_allclose(odd, np.concatenate([2 * X, 4 * X]), rtol=1e-6)
    outputs = dict(zip([o.name for o in exposed.graph.output], run(exposed, {"x": X[:0]})))  # no sample
    assert where["h_in_fc_odd"].rows(*(outputs[o] for o in where["h_in_fc_odd"].outputs)).shape == (0, 6)
    with pytest.raises(ValueError, match="shape changes between iterations"):  # rows of [1, 4] then [1, 6]
        Exposed("v", shapes="s").rows(np.zeros(10), np.array([2, 1, 4, 2, 1, 6]))


def test_a_layer_in_an_if_inside_a_scan_is_skipped_with_the_reason(tmp_path):
    xs = RNG.standard_normal((4, 10, 6)).astype(np.float32)
    with pytest.raises(ModelError, match="If branch inside the body of Scan 'scan'"):
        quantize(if_in_scan_model(), tmp_path / "q.onnx", calibration={"xs": xs}, bits=2, speed=False)
    with pytest.raises(ValueError, match="cannot carry a value whose shape changes"):
        expose(prepare(if_in_scan_model()), ["x_t_in_fc_pos"])
