"""``--sequential`` gathers each input's statistics once per change that can reach it: the groups of
a depthwise Conv and the layers reading one input (q and k) share one pass over the calibration data,
and the written model is the same bytes as when every layer is gathered again on its own."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from runs import quantize

from onnx_qubo import api, pipeline
from onnx_qubo.graph import runtime
from onnx_qubo.model import discovery
from onnx_qubo.model.discovery import find_dense_layers, latest_feeders


def separable_model(spatial: tuple[int, int] = (4, 2)) -> onnx.ModelProto:
    """Conv -> depthwise Conv (8 groups) -> 1x1 Conv -> q and k on one input -> q*k -> o."""
    rng = np.random.default_rng(0)
    weights = {"W1": rng.standard_normal((8, 3, 3, 3)) / 3, "W2": rng.standard_normal((8, 1, 3, 3)) / 2,
               "B2": rng.standard_normal(8), "W3": rng.standard_normal((6, 8, 1, 1)) / 2,
               "Wq": rng.standard_normal((6, 5)), "Wk": rng.standard_normal((6, 5)), "Wo": rng.standard_normal((10, 4))}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inits.append(numpy_helper.from_array(np.array([-1, 10], np.int64), "shape"))
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["h2"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Conv", ["r2", "W3"], ["h3"], name="pw"),
             helper.make_node("Transpose", ["h3"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "Wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["t", "Wk"], ["k"], name="k"),
             helper.make_node("Mul", ["q", "k"], ["qk"]),
             helper.make_node("Reshape", ["qk", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "Wo"], ["y"], name="o")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, *spatial])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


X = np.random.default_rng(1).standard_normal((16, 3, 4, 2)).astype(np.float32)


def test_latest_feeders_name_the_last_layer_each_input_depends_on():
    layers, _ = find_dense_layers(separable_model())
    assert [layer.name for layer in layers] == ["c1", "dw", "pw", "q", "k", "o"]
    assert latest_feeders(separable_model(), layers) == [-1, 0, 1, 2, 2, 4]  # k does not depend on q


def test_one_pass_per_input_and_the_same_bytes_as_a_pass_per_layer(tmp_path, monkeypatch):
    passes = []
    collect = pipeline.collect_statistics

    def counted(model, layers, *args, **kwargs):
        passes.append([layer.statistics_key for layer in layers])
        return collect(model, layers, *args, **kwargs)

    monkeypatch.setattr(pipeline, "collect_statistics", counted)
    options = dict(calibration={"x": X}, bits=2, sequential=True, bias_correction=True, speed=False)
    shared = quantize(separable_model(), tmp_path / "shared.onnx", **options)
    assert len(passes) == 4  # dw's 8 groups, pw, q and k, o
    assert len(passes[0]) == 8 and len(passes[2]) == 2

    passes.clear()  # every layer fed by the one before it: each gathered again, as before sharing
    monkeypatch.setattr(discovery, "latest_feeders", lambda model, layers: [k - 1 for k in range(len(layers))])
    alone = quantize(separable_model(), tmp_path / "alone.onnx", **options)
    assert len(passes) == 12  # every layer but the first, each of dw's groups on its own
    assert (tmp_path / "shared.onnx").read_bytes() == (tmp_path / "alone.onnx").read_bytes()
    assert [r.cost_solved for r in shared.layers] == [r.cost_solved for r in alone.layers]


def mlp_model() -> onnx.ModelProto:
    """x -> MatMul -> Relu -> MatMul: layers fed by layers, no Conv."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_unset_it_is_on_where_a_conv_layer_is_fed_by_another(tmp_path):
    common = dict(bits=2, speed=False)
    conv = quantize(separable_model(), tmp_path / "a.onnx", calibration={"x": X}, **common)
    assert any(note.startswith("sequential calibration (--sequential: the default") for note in conv.notes)
    off = quantize(separable_model(), tmp_path / "b.onnx", calibration={"x": X}, sequential=False, **common)
    assert not any("sequential" in note for note in off.notes)
    assert [r.cost_solved for r in conv.layers][1:] != [r.cost_solved for r in off.layers][1:]
    quantize(separable_model(), tmp_path / "c.onnx", calibration={"x": X}, sequential=True, **common)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
    x = np.random.default_rng(4).standard_normal((32, 6)).astype(np.float32)
    mlp = quantize(mlp_model(), tmp_path / "m.onnx", calibration={"x": x}, **common)
    assert not any("sequential" in note for note in mlp.notes)


@pytest.mark.slow
def test_the_same_bytes_whatever_onnxruntimes_threads(tmp_path, monkeypatch):
    """The passes run the float and the partly quantized model in onnxruntime: its thread count
    (the machine's cores by default) must not change a statistic."""
    x = np.random.default_rng(5).standard_normal((64, 3, 24, 24)).astype(np.float32)
    written, session_options = [], ort.SessionOptions
    for threads in (1, 4):
        def options(threads=threads) -> ort.SessionOptions:
            made = session_options()
            made.intra_op_num_threads = threads
            return made

        monkeypatch.setattr(runtime.ort, "SessionOptions", options)
        path = tmp_path / f"{threads}.onnx"
        report = quantize(separable_model((24, 24)), path, calibration={"x": x}, bits=3, speed=False)
        assert any(note.startswith("sequential calibration") for note in report.notes)
        written.append(path.read_bytes())
    assert written[0] == written[1]


def test_compare_resolves_it_as_quantize_does():
    common = dict(calibration={"x": X}, bits=[2], scales=["mse"], solvers=["rtn"])
    assert "sequential calibration" in api.compare(separable_model(), **common).scheme
    assert "sequential calibration" not in api.compare(separable_model(), sequential=False, **common).scheme
