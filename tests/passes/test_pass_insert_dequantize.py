"""InsertDequantize: each weight's node rewritten by the lowering handed in, around integers and
their DequantizeLinear (or a kernel's nodes); a bias correction added after it; the float weight
dropped; a weight read by more than one node refused."""

from dataclasses import dataclass

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.passes import (
    CheckModel,
    InsertDequantize,
    PassFailed,
    PrepareSubgraphs,
    QuantizedTensor,
    QuantizedWeight,
    RaiseOpset,
    UnsupportedModel,
    run_passes,
)
from onnx_qubo.passes.insert_dequantize import dequantized

from graphs import gemm_model, if_model
from helpers_passes import GemmLowering, external, int8, run

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 6)).astype(np.float32)
INTEGERS = RNG.integers(-128, 128, size=(5, 6))


def _bias(model):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "C"))


def test_the_weight_is_replaced_by_its_dequantized_integers_and_a_shift_added():
    model = gemm_model(relu=False)
    shift = RNG.standard_normal(5).astype(np.float32)
    weight = QuantizedWeight("W", int8(INTEGERS, 0.01), GemmLowering(), 2, output_shift=shift)
    out = run_passes(model, [RaiseOpset(13), InsertDequantize([weight]), CheckModel()]).model
    assert "W" not in {i.name for i in out.graph.initializer}
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "Gemm", "Add"]
    stored = next(i for i in out.graph.initializer if i.name == "W_quantized")
    assert stored.data_type == TensorProto.INT8
    expected = X @ (INTEGERS * np.float32(0.01)).T.astype(np.float32) + _bias(model) + shift
    np.testing.assert_allclose(run(out, {"x": X})[0], expected, rtol=1e-5, atol=1e-5)


def test_per_row_scales_and_zero_points_dequantize_as_numpy_does():
    scale = RNG.random(5).astype(np.float32) * 0.1 + 0.01
    zero_point = RNG.integers(0, 16, size=5)
    tensor = QuantizedTensor(RNG.integers(0, 16, size=(5, 6)), scale, zero_point, TensorProto.UINT4)
    weight = QuantizedWeight("W", tensor, GemmLowering(), 2)
    out = run_passes(gemm_model(relu=False), [RaiseOpset(21), InsertDequantize([weight]), CheckModel()]).model
    w = (tensor.integers - zero_point[:, None]) * scale[:, None]
    expected = X @ w.T.astype(np.float32) + _bias(gemm_model(relu=False))
    np.testing.assert_allclose(run(out, {"x": X})[0], expected, rtol=1e-5, atol=1e-5)


def test_a_layer_in_a_body_is_rewritten_where_it_lives():
    model = PrepareSubgraphs().call(if_model()).model
    tensor = int8(RNG.integers(-128, 128, size=(5, 6)), 0.02)
    out = run_passes(model, [RaiseOpset(13), InsertDequantize([QuantizedWeight("W1", tensor, GemmLowering(), 2)]),
                             CheckModel()]).model
    then = next(a.g for a in out.graph.node[-1].attribute if a.name == "then_branch")
    assert "DequantizeLinear" in [n.op_type for n in then.node]
    assert "W1_quantized" in {i.name for i in out.graph.initializer}  # integers in the main graph
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    pre = np.tanh(x @ numpy_helper.to_array(model.graph.initializer[0]).T)
    c1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "C1"))
    np.testing.assert_allclose(run(out, {"x_in": x, "cond": np.array(True)})[0], pre @ dequantized(tensor).T + c1,
                               rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class _Nodes:
    nodes: list
    initializers: list
    opsets: dict


class _NegKernel:
    """A stand-in runtime kernel, written as Neg -> MatMul."""

    def build(self, activation, output, fresh):
        weight = fresh("kernel_weight")
        negated = fresh("negated")
        return _Nodes([helper.make_node("Neg", [activation], [negated]),
                       helper.make_node("MatMul", [negated, weight], [output], domain="")],
                      [numpy_helper.from_array(np.eye(6, 5, dtype=np.float32), weight)], {"": 13})


class _Refused:
    def build(self, activation, output, fresh):
        return "the kernel does not take this layer"


def test_a_kernel_layer_is_written_instead_of_dequantize_linear():
    weight = QuantizedWeight("W", int8(INTEGERS, 0.01), GemmLowering(), 2, fast=_NegKernel())
    out = InsertDequantize([weight]).call(gemm_model(relu=False)).model
    assert [n.op_type for n in out.graph.node] == ["Neg", "MatMul"]
    np.testing.assert_allclose(run(out, {"x": X})[0], -X @ np.eye(6, 5, dtype=np.float32), rtol=1e-6)
    refused = QuantizedWeight("W", int8(INTEGERS, 0.01), GemmLowering(), 2, fast=_Refused())
    with pytest.raises(PassFailed, match="layer weight 'W': the kernel does not take this layer"):
        run_passes(gemm_model(), [InsertDequantize([refused])])


def test_a_shared_weight_is_refused():
    model = gemm_model()
    model.graph.node.append(helper.make_node("Gemm", ["x", "W"], ["z"], transB=1))
    with pytest.raises(PassFailed, match="initializer 'W' is read by 2 nodes; expected exactly one"):
        run_passes(model, [InsertDequantize([QuantizedWeight("W", int8(INTEGERS, 1.0), GemmLowering(), 2)])])


def test_lowerings_read_initializers_through_the_reader_given():
    model = gemm_model()
    bias = model.graph.initializer[1]
    values = numpy_helper.to_array(bias)
    model.graph.initializer[1].CopyFrom(external(bias))
    seen = []

    class ReadsBias(GemmLowering):
        def lower(self, node, weight, edit):
            seen.append(edit.read(next(i for i in edit.graph.initializer if i.name == "C")))
            return super().lower(node, weight, edit)

    weight = QuantizedWeight("W", int8(INTEGERS, 0.01), ReadsBias(), 2)
    InsertDequantize([weight], lambda tensor, owner: values if tensor.name == "C" else None).call(model)
    np.testing.assert_array_equal(seen[0], values)
    with pytest.raises(UnsupportedModel, match="tensor 'C' refers to external data"):  # the default reader
        run_passes(model, [InsertDequantize([weight])])


@pytest.mark.parametrize("scale_shape", [(), (5,), (5, 3)])
def test_dequantized_is_what_dequantize_linear_computes(scale_shape):
    """Per tensor, per row along axis 0, per block of 4 along axis 1 (the last block shorter),
    with zero points: numpy against onnxruntime's DequantizeLinear on the same tensor."""
    rng = np.random.default_rng(len(scale_shape))
    integers = rng.integers(0, 256, (5, 10)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, scale_shape).astype(np.float32)
    zero = rng.integers(0, 256, scale_shape).astype(np.uint8)
    tensor = QuantizedTensor(integers.astype(np.int64), scale, zero.astype(np.int64), TensorProto.UINT8, 4)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **tensor.attributes())
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(integers, "q"), numpy_helper.from_array(scale, "s"),
                               numpy_helper.from_array(zero, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    np.testing.assert_array_equal(dequantized(tensor), run(model, {})[0])

