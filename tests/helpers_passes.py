"""What the pass tests share (tests/passes/, tests/test_passes.py): running a model with
onnxruntime, a minimal ``DenseLowering`` (a Gemm with ``transB=1`` reading its dequantized
weight), a tensor turned external, and passes that fail."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnx_qubo.passes import GraphEdit, Lowered, PassResult, QuantizedTensor, QuantizedWeight, UnsupportedModel


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


class GemmLowering:
    """A Gemm(transB=1) reading DequantizeLinear's output instead of its float weight."""

    op_type = "Gemm"

    def lower(self, node: onnx.NodeProto, weight: QuantizedWeight, edit: GraphEdit) -> Lowered:
        if weight.fast is not None:
            return edit.fast(weight, node.input[0], node.output[0])
        nodes, dequantized = edit.dequantize(weight.name, weight.weight)
        gemm = onnx.NodeProto()
        gemm.CopyFrom(node)
        gemm.input[1] = dequantized
        return Lowered(nodes + [gemm])


def int8(integers: np.ndarray, scale: float) -> QuantizedTensor:
    return QuantizedTensor(integers, np.asarray(scale, np.float32), None, TensorProto.INT8)


def external(tensor: onnx.TensorProto, location: str = "weights.bin") -> onnx.TensorProto:
    """``tensor`` turned into a reference to a file (which need not exist)."""
    ref = onnx.TensorProto()
    ref.CopyFrom(tensor)
    ref.ClearField("raw_data")
    ref.ClearField("float_data")
    ref.data_location = TensorProto.EXTERNAL
    ref.external_data.add(key="location", value=location)
    return ref


def floats(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


class Broken:
    """A pass failing with an exception of another kind."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise KeyError("boom")


class Refuses:
    """A pass refusing the model with its own error."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise UnsupportedModel("node 'x' cannot be handled")
