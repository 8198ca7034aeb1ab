import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.model.discovery import find_dense_layers

from graphs import gemm_model, matmul_model, weight_of


def only_layer(model):
    layers, skipped = find_dense_layers(model)
    assert len(layers) == 1 and not skipped
    return layers[0]


def test_gemm_trans_b_1_keeps_weight_orientation_and_alpha():
    model = gemm_model(trans_b=1, alpha=0.5)
    layer = only_layer(model)
    assert layer.label == "Gemm(transB=1)" and layer.gain == 0.5
    np.testing.assert_array_equal(layer.weight, weight_of(model))
    assert layer.input_name == "x" and layer.weight_name == "W"


def test_gemm_trans_b_0_weight_is_transposed_to_out_by_in():
    model = gemm_model(f=6, n=5, trans_b=0, bias=False)
    layer = only_layer(model)
    assert layer.shape == (5, 6)
    np.testing.assert_array_equal(layer.weight, weight_of(model).T)


def test_matmul_forms():
    assert only_layer(matmul_model(bias=True)).label == "MatMul+Add"
    assert only_layer(matmul_model(bias=False)).label == "MatMul"
    layer = only_layer(matmul_model(leading=(7,)))
    assert layer.label == "MatMul+Add (N-D)" and layer.input_rank == 3
    assert layer.shape == (5, 6)


def _two_node_model(nodes, inits, inputs):
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _x(f=4):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", f])


def test_shared_weight_is_skipped_with_reason():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="b")]
    layers, skipped = find_dense_layers(_two_node_model(nodes, [w], [_x()]))
    assert not layers
    assert [s.name for s in skipped] == ["a", "b"]
    assert all("shared by 2 nodes" in s.reason for s in skipped)


def test_non_constant_weight_trans_a_and_left_constant_are_skipped():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    v = numpy_helper.from_array(np.ones((4, 4), np.float32), "V")
    nodes = [helper.make_node("MatMul", ["x", "x2"], ["h"], name="dynamic"),
             helper.make_node("Gemm", ["h", "W"], ["h2"], transA=1, name="transposed"),
             helper.make_node("MatMul", ["V", "h2"], ["y"], name="left")]
    inputs = [_x(), helper.make_tensor_value_info("x2", TensorProto.FLOAT, [4, 4])]
    layers, skipped = find_dense_layers(_two_node_model(nodes, [w, v], inputs))
    assert not layers
    reasons = {s.name: s.reason for s in skipped}
    assert "not a constant initializer" in reasons["dynamic"]
    assert "transA=1" in reasons["transposed"]
    assert "left operand" in reasons["left"]


def test_weight_overridable_as_graph_input_is_skipped():
    model = gemm_model()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [5, 6]))
    layers, skipped = find_dense_layers(model)
    assert not layers and "graph input" in skipped[0].reason


def test_unnamed_nodes_get_unique_names():
    model = gemm_model()
    for node in model.graph.node:
        node.name = ""
    assert only_layer(model).name == "Gemm_0"


def test_non_float_weight_is_skipped():
    model = gemm_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight_of(model).astype(np.float64), "W"))
    layers, skipped = find_dense_layers(model)
    assert not layers and "DOUBLE" in skipped[0].reason


def test_biases_that_can_be_quantized_are_found_with_beta_folded():
    gemm = find_dense_layers(gemm_model(beta=0.5))[0][0]
    c = next(numpy_helper.to_array(i) for i in gemm_model(beta=0.5).graph.initializer if i.name == "C")
    assert gemm.bias_name == "C"
    np.testing.assert_allclose(gemm.bias, 0.5 * c)
    assert find_dense_layers(matmul_model(bias=True))[0][0].bias_name == "b"
    assert find_dense_layers(matmul_model(bias=False))[0][0].bias is None
    shared = gemm_model()
    shared.graph.node.append(helper.make_node("Add", ["y", "C"], ["z"]))  # C read twice: stays float
    assert find_dense_layers(shared)[0][0].bias is None


def test_ranks_are_inferred_without_the_weights_values():
    """Shape inference runs on a copy without large weight values (a model over 2 GB cannot be
    serialized for it); small initializers such as a Reshape's target shape keep theirs."""
    from onnx_qubo.forms.base import tensor_ranks
    from onnx_qubo.graph.subgraphs import SHAPE_VALUES, skeleton
    model = matmul_model(f=64, n=40, leading=(3,))  # W has 2,560 > SHAPE_VALUES elements
    shape = numpy_helper.from_array(np.array([-1, 120], np.int64), "shape")
    model.graph.initializer.append(shape)
    model.graph.node.append(helper.make_node("Reshape", ["y", "shape"], ["flat"]))
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, None))
    stripped = skeleton(model)
    weights = {i.name: i for i in stripped.graph.initializer}
    assert not weights["W"].raw_data and not weights["W"].float_data and 40 * 64 > SHAPE_VALUES
    assert numpy_helper.to_array(weights["shape"]).tolist() == [-1, 120]
    ranks = tensor_ranks(model)
    assert ranks["x"] == 3 and ranks["h"] == 3 and ranks["flat"] == 2
