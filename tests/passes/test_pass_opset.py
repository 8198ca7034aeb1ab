"""RaiseOpset: bump the import when no operator changed, convert otherwise, refuse what onnx
cannot convert."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.passes import CheckModel, RaiseOpset, UnsupportedModel, run_passes
from onnx_qubo.passes.opset import default_opset

from graphs import gemm_model
from helpers_passes import floats, run


def test_raise_opset_bumps_when_no_definition_changed_and_converts_otherwise():
    simple = gemm_model()  # Gemm + Relu: same definitions at 17 and 25
    raised = RaiseOpset(25).call(simple)
    assert raised.modified and default_opset(raised.model) == 25
    assert raised.model.ir_version >= onnx.helper.find_min_ir_version_for(list(raised.model.opset_import))
    assert RaiseOpset(13).call(simple).modified is False

    # Reshape changed definition between 17 and 25: the version converter rewrites it
    shape = numpy_helper.from_array(np.array([-1, 6], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [floats("x", ["B", 2, 3])], [floats("y", ["B", 6])], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = run_passes(model, [RaiseOpset(25), CheckModel()]).model
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    np.testing.assert_array_equal(run(out, {"x": x})[0], x.reshape(2, 6))
    assert default_opset(out) == 25


def _with_function(op: str) -> onnx.ModelProto:
    """x -> local.Act (a function of one ``op`` node, importing opset 13) -> y."""
    body = [helper.make_node(op, ["a"], ["b"])]
    function = helper.make_function("local", "Act", ["a"], ["b"], body, [helper.make_opsetid("", 13)])
    graph = helper.make_graph([helper.make_node("Act", ["x"], ["y"], domain="local")], "g",
                              [floats("x", [3])], [floats("y", [3])])
    imports = [helper.make_opsetid("", 13), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=imports, functions=[function], ir_version=8)


def test_a_local_function_is_raised_with_the_model_or_refused_naming_it():
    raised = RaiseOpset(25).call(_with_function("Abs")).model  # Abs is the same at 13 and 25
    assert [o.version for o in raised.functions[0].opset_import if o.domain == ""] == [25]
    with pytest.raises(UnsupportedModel, match="local function 'local.Act' uses Relu as defined at opset 13"):
        RaiseOpset(25).call(_with_function("Relu"))


def test_a_model_the_converter_cannot_convert_is_refused_naming_both_opsets():
    model = gemm_model()
    model.opset_import[0].version = 1  # onnx's converter has no adapters from opset 1
    model.graph.node.append(helper.make_node("Upsample", ["y"], ["z"], mode="nearest"))
    model.graph.value_info.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    with pytest.raises(UnsupportedModel, match="cannot raise the model's opset from 1 to 25"):
        RaiseOpset(25).call(model)
