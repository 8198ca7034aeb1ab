"""The output layers (a language model's head, a classifier's last layer) and --head-bits: found
through shape and element-wise steps, not through a residual Add; 4 bits below 4 by default,
except in a model whose every layer is one."""

import numpy as np
import onnx
import pytest
import runs
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.errors import OptionError
from onnx_qubo.model.discovery import find_dense_layers, output_layers
from onnx_qubo.plan import make_plan

from graphs import gemm_model, mlp_model


def _block_with_head(residual: bool) -> onnx.ModelProto:
    """x [B, 8] -> fc (MatMul) -> [+ x] -> head (MatMul+Add) -> Reshape -> Softmax -> y; or, with
    ``residual``, the head's output added to fc's before the output (a transformer block's end)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), name) for name in ("W", "H")]
    inits += [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "c"),
              numpy_helper.from_array(np.array([-1, 2, 4], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("MatMul", ["h", "H"], ["g"], name="head"),
             helper.make_node("Add", ["g", "c"], ["z"], name="head_bias")]
    if residual:
        nodes.append(helper.make_node("Add", ["z", "h"], ["y"], name="residual"))
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])
    else:
        nodes += [helper.make_node("Reshape", ["z", "shape"], ["r"], name="reshape"),
                  helper.make_node("Softmax", ["r"], ["y"], name="softmax")]
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2, 4])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
                              [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _written_out_softmax(shared_input: bool) -> onnx.ModelProto:
    """x [B, 8] -> head (MatMul) -> z - max(z) -> exp -> e / sum(e) broadcast to e's shape (as jax2tf
    writes a softmax); with ``shared_input`` the max is taken of x instead: a second input mixed in."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "H"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("MatMul", ["x", "H"], ["z"], name="head"),
             helper.make_node("ReduceMax", ["x" if shared_input else "z"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Sub", ["z", "m"], ["s"]),
             helper.make_node("Exp", ["s"], ["e"]),
             helper.make_node("ReduceSum", ["e", "axes"], ["t"], keepdims=1),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Expand", ["t", "shape"], ["u"]),
             helper.make_node("Div", ["e", "u"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _outputs(model: onnx.ModelProto) -> list[str]:
    return output_layers(model, find_dense_layers(model)[0])


def test_the_head_is_found_through_its_bias_and_shape_and_element_wise_steps():
    assert _outputs(_block_with_head(residual=False)) == ["head"]
    assert _outputs(mlp_model()) == ["fc1"]


def test_a_residual_add_is_not_a_step_through_which_a_layer_is_the_output():
    assert _outputs(_block_with_head(residual=True)) == []


def test_a_softmax_written_out_is_a_step_but_not_one_that_mixes_in_another_input():
    assert _outputs(_written_out_softmax(shared_input=False)) == ["head"]
    assert _outputs(_written_out_softmax(shared_input=True)) == []


def _bits(config: QuantizeConfig, model: onnx.ModelProto) -> dict[str, int]:
    layers = find_dense_layers(model)[0]
    return {p.layer.name: p.scheme.bits for p in make_plan(config, layers, output_layers(model, layers)).layers}


def test_head_bits_default_widens_the_head_below_four_bits_only():
    model = _block_with_head(residual=False)
    assert _bits(QuantizeConfig.from_flat(bits=2), model) == {"fc": 2, "head": 4}
    assert _bits(QuantizeConfig.from_flat(bits=3), model) == {"fc": 3, "head": 4}
    assert _bits(QuantizeConfig.from_flat(bits=8), model) == {"fc": 8, "head": 8}
    assert _bits(QuantizeConfig.from_flat(bits=2, head_bits=2), model) == {"fc": 2, "head": 2}
    assert _bits(QuantizeConfig.from_flat(bits=4, head_bits=8), model) == {"fc": 4, "head": 8}
    assert _bits(QuantizeConfig.from_flat(bits=2, layer_bits={"head": 3}), model) == {"fc": 2, "head": 3}


def test_a_one_layer_model_gets_the_bits_asked_for_unless_head_bits_is_given():
    model = gemm_model()
    assert _bits(QuantizeConfig.from_flat(bits=2), model) == {"dense": 2}
    assert _bits(QuantizeConfig.from_flat(bits=2, head_bits=8), model) == {"dense": 8}


def test_head_bits_is_refused_with_the_automatic_choice_and_checked():
    with pytest.raises(OptionError, match="head_bits"):
        QuantizeConfig.from_flat(bits=2, head_bits=4, bits_per_weight=3.0)
    with pytest.raises(OptionError, match="head_bits"):
        QuantizeConfig.from_flat(bits=2, head_bits=9)
    assert QuantizeConfig.from_flat(bits=2, bits_per_weight=3.0).widths == {2}


def test_the_report_names_the_widened_head_and_the_written_model_holds_it(tmp_path):
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    report = runs.quantize(_block_with_head(residual=False), tmp_path / "q.onnx", bits=2, calibration={"x": x},
                           speed=False)
    assert [(layer.name, layer.bits) for layer in report.layers] == [("fc", 2), ("head", 4)]
    assert any("output layer head at 4 bits" in note for note in report.notes)
    stored = {i.name: i.data_type for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    assert stored["H_quantized"] in (TensorProto.INT4, TensorProto.UINT4)
    assert stored["W_quantized"] in (TensorProto.INT2, TensorProto.UINT2)
    assert report.evaluation.default_vs_unoptimized < 1e-5 and report.evaluation.basic_vs_unoptimized < 1e-5
