"""Exports as they come: weights in Constant nodes or behind Transpose/Cast chains are folded
into initializers (same outputs) and quantized; dense nodes inside subgraphs and recurrent
cells are listed as skipped with a reason."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from runs import quantize

from onnx_qubo.model.discovery import find_dense_layers
from onnx_qubo.passes import FoldConstantWeights

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 5)).astype(np.float32)  # [f, n]
B = RNG.standard_normal(5).astype(np.float32)


def model_with(nodes, initializers, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 5])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def constant_weights():
    return model_with([
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W)),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(B)),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="dense"),
        helper.make_node("Add", ["h", "b"], ["y"])], [])


def fp16_transposed_weight():
    """W stored as FP16 [n, f], cast to float and transposed before a MatMul (a common export)."""
    return model_with([
        helper.make_node("Cast", ["W16"], ["W32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["W32"], ["W"], perm=[1, 0]),
        helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="dense")],
        [numpy_helper.from_array(W.T.astype(np.float16), "W16"), numpy_helper.from_array(B, "b")])


def run(model, x, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("make", [constant_weights, fp16_transposed_weight])
def test_hidden_weights_fold_into_initializers_with_the_same_outputs(make):
    model = make()
    assert find_dense_layers(model)[0] == []  # not visible before folding
    before = model.SerializeToString()
    folded = FoldConstantWeights().call(model)
    assert folded.modified and model.SerializeToString() == before
    x = RNG.standard_normal((7, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(folded.model, x), run(model, x))
    onnx.checker.check_model(folded.model, full_check=True)
    layers, skipped = find_dense_layers(folded.model)
    assert len(layers) == 1 and not skipped
    assert {n.op_type for n in folded.model.graph.node} <= {"MatMul", "Add", "Gemm"}
    assert "W16" not in {i.name for i in folded.model.graph.initializer}  # the source is gone with its chain


def test_a_chain_whose_tensor_is_shared_is_left_alone():
    model = fp16_transposed_weight()
    model.graph.node.append(helper.make_node("Identity", ["W32"], ["W32_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("W32_copy", TensorProto.FLOAT, [5, 6]))
    assert FoldConstantWeights().call(model).modified is False


@pytest.mark.parametrize("make", [constant_weights, fp16_transposed_weight])
def test_hidden_weights_are_quantized_end_to_end(make, tmp_path):
    x = RNG.standard_normal((64, 6)).astype(np.float32)
    report = quantize(make(), tmp_path / "q.onnx", bits=4, calibration={"x": x}, solver="rtn")
    assert len(report.layers) == 1 and report.layers[0].storage == "INT4"
    quantized = onnx.load(tmp_path / "q.onnx")
    assert not any(i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and list(i.dims) in ([6, 5], [5, 6])
                   for i in quantized.graph.initializer)
    assert report.evaluation.relative_output_error < 0.1


def test_layers_inside_subgraphs_are_matched_like_the_main_graph_and_recurrent_cells_skipped():
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["then_out"], name="inner")], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["B", 5])])
    other = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["else_out"], name="inner2")], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["B", 5])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=body, else_branch=other),
         helper.make_node("GRU", ["seq", "Wg", "Rg"], ["", "state"], hidden_size=2, name="cell")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("seq", TensorProto.FLOAT, [3, "B", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 5])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.ones((1, 6, 4), np.float32), "Wg"),
         numpy_helper.from_array(np.ones((1, 6, 2), np.float32), "Rg")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layers, skipped = find_dense_layers(model)
    assert layers == []
    reasons = {(s.name, s.op_type): s.reason for s in skipped}
    assert set(reasons) == {("branch/then_branch/inner", "MatMul"), ("branch/else_branch/inner2", "MatMul"),
                            ("cell", "GRU")}
    assert reasons["branch/then_branch/inner", "MatMul"] == "weight 'W' is shared by 2 nodes"  # one W, two branches
    assert "recurrent cell" in reasons["cell", "GRU"]


def test_an_output_shape_the_exporter_declared_wrongly_is_reinferred_with_a_note(tmp_path):
    """ddddocr's CRNN declares a rank-2 output that is rank 3; the full check of the rewritten
    model then fails on shape inference: the outputs get the inferred shapes and the report says so."""
    model = constant_weights()
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    for dim in (1, "B", 5):  # rank 3, the real output is rank 2
        model.graph.output[0].type.tensor_type.shape.dim.add().CopyFrom(
            helper.make_tensor_type_proto(TensorProto.FLOAT, [dim]).tensor_type.shape.dim[0])
    x = RNG.standard_normal((32, 6)).astype(np.float32)
    report = quantize(model, tmp_path / "q.onnx", bits=4, calibration={"x": x}, speed=False)
    assert any("declared tensor shapes contradict shape inference" in note for note in report.notes)
    written = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(written, full_check=True)
    dims = written.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["B", 5]
