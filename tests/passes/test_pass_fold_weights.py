"""FoldConstantWeights: Constant nodes and layout/type chains before a dense weight become
initializers computing the same outputs; values in external data come through the reader given."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.passes import FoldConstantWeights, PassFailed, UnsupportedModel, run_passes

from helpers_passes import external, floats, run

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 5)).astype(np.float32)  # [f, n]
X = RNG.standard_normal((4, 6)).astype(np.float32)


def _model(nodes, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [floats("x", ["B", 6])], [floats("y", ["B", 5])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def constant_weight() -> onnx.ModelProto:
    return _model([helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W)),
                   helper.make_node("MatMul", ["x", "W"], ["y"])], [])


def fp16_transposed_weight() -> onnx.ModelProto:
    return _model([helper.make_node("Cast", ["W16"], ["W32"], to=TensorProto.FLOAT),
                   helper.make_node("Transpose", ["W32"], ["W"], perm=[1, 0]),
                   helper.make_node("Gemm", ["x", "W"], ["y"])],
                  [numpy_helper.from_array(W.T.astype(np.float16), "W16")])


@pytest.mark.parametrize("make", [constant_weight, fp16_transposed_weight])
def test_hidden_weights_become_one_initializer_with_the_same_outputs(make):
    model = make()
    folded = FoldConstantWeights().call(model)
    assert folded.modified
    assert [n.op_type for n in folded.model.graph.node] in (["MatMul"], ["Gemm"])
    assert [i.name for i in folded.model.graph.initializer] == ["W"]  # the chain's source is gone
    np.testing.assert_array_equal(run(folded.model, {"x": X})[0], run(model, {"x": X})[0])
    onnx.checker.check_model(folded.model, full_check=True)


def test_a_chain_whose_tensor_is_shared_is_left_alone():
    model = fp16_transposed_weight()
    model.graph.node.append(helper.make_node("Identity", ["W32"], ["W32_copy"]))
    model.graph.output.append(floats("W32_copy", [5, 6]))
    result = FoldConstantWeights().call(model)
    assert result.modified is False and result.model is model


def test_external_values_are_read_by_the_reader_given_and_refused_without_one():
    model = fp16_transposed_weight()
    stored = model.graph.initializer[0]
    values = numpy_helper.to_array(stored)
    model.graph.initializer[0].CopyFrom(external(stored))
    with pytest.raises(UnsupportedModel, match="tensor 'W16' refers to external data"):
        FoldConstantWeights().call(model)
    read = []

    def reader(tensor, owner):
        read.append((tensor.name, owner is not None))
        return values

    folded = FoldConstantWeights(reader).call(model).model
    assert read == [("W16", True)]
    np.testing.assert_array_equal(numpy_helper.to_array(folded.graph.initializer[0]),
                                  W.astype(np.float16).astype(np.float32))


def test_a_reader_failure_is_named_with_the_pass():
    model = fp16_transposed_weight()
    model.graph.initializer[0].CopyFrom(external(model.graph.initializer[0]))

    def reader(tensor, owner):
        raise OSError(f"no file for '{tensor.name}'")

    with pytest.raises(PassFailed, match="graph pass FoldConstantWeights failed: no file for 'W16'"):
        run_passes(model, [FoldConstantWeights(reader)])
