"""``MatMul(x, W)`` with a constant 2-D ``W``, on 2-D or N-D activations, optionally followed by
an ``Add`` of a constant (the bias), as skl2onnx, Keras and transformer exports write it.

The weight maps to [n_out, f_in] as W^T; the gain is 1. Lowered to ``DequantizeLinear ->
Gemm(transB=1)`` (backends/portable.py rule 1): on 2-D activations the Gemm replaces the MatMul; on N-D
ones it is wrapped in ``Reshape [-1, f] -> Gemm -> Reshape`` back to the activation's leading
axes plus n, with a quantized input quantized after the flattening Reshape (rule 3). A
quantized bias replaces the Add's constant operand, which the Add keeps reading.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.types import DenseLayer
from ..passes.insert_dequantize import GraphEdit, Lowered, QuantizedWeight, dequantized
from .base import HALF_OR_FLOAT_WEIGHTS, LAST_AXIS, GraphIndex, Skip, transposed


class MatMulForm:
    op_type = "MatMul"

    def match(self, node: onnx.NodeProto, name: str, index: GraphIndex) -> DenseLayer | Skip:
        activation, weight_name = node.input[0], node.input[1]
        if weight_name not in index.initializers and activation in index.initializers:
            return Skip(f"the constant '{activation}' is the left operand (W @ x); only x @ W is supported")
        init = index.constant_weight(activation, weight_name, types=HALF_OR_FLOAT_WEIGHTS)
        if isinstance(init, Skip):
            return init
        n, f = init.dims[1], init.dims[0]
        weight = index.weight_values(init, transposed, (n, f))
        add = _constant_add(node.output[0], index)
        label = "MatMul+Add" if add else "MatMul"
        if index.ranks.get(activation) != 2:
            label += " (N-D)"
        bias_name = next((t for t in add.input if t != node.output[0]), "") if add else ""
        bias = index.bias_vector(bias_name, n, rank=index.ranks.get(activation), float_type=init.data_type)
        if isinstance(bias, Skip):
            return bias
        return DenseLayer(name, self, label, activation, index.ranks.get(activation), weight_name, weight, 1.0,
                          bias, bias_name if bias is not None else None, view=LAST_AXIS, float_type=init.data_type)

    def lower(self, node: onnx.NodeProto, weight: QuantizedWeight, edit: GraphEdit) -> Lowered:
        if weight.fast is not None:  # any activation rank; a quantized bias stays in the Add, as floats
            lowered = edit.fast(weight, node.input[0], node.output[0])
            if weight.bias is not None and weight.bias_name is not None:
                lowered.renames[weight.bias_name] = edit.constant(f"{weight.bias_name}_dequantized",
                                                                  dequantized(weight.bias))
            elif weight.float_bias is not None and weight.bias_name is not None:
                lowered.renames[weight.bias_name] = edit.constant(f"{weight.bias_name}_corrected", weight.float_bias)
            return lowered
        nodes, deq = edit.dequantize(weight.name, weight.weight)
        renames = {}
        if weight.bias is not None and weight.bias_name is not None:
            bias_nodes, renames[weight.bias_name] = edit.dequantize(weight.bias_name, weight.bias)
            nodes += bias_nodes
        elif weight.float_bias is not None and weight.bias_name is not None:  # the Add reads the corrected bias
            renames[weight.bias_name] = edit.constant(f"{weight.bias_name}_corrected", weight.float_bias)
        if weight.activation_rank == 2:
            qdq, activation = edit.quantize_activation(node.input[0], weight.activation)
            gemm = helper.make_node("Gemm", [activation, deq], [node.output[0]], transB=1, name=node.name)
            return Lowered(nodes + qdq + [gemm] + _offsets(gemm, weight, edit), renames)
        n, f = weight.weight.integers.shape
        prefix = node.name or weight.name
        flat_shape, flat, flat_out, shape, lead, starts, ends, width, out_shape = (
            edit.fresh(f"{prefix}_{suffix}") for suffix in
            ("flat_shape", "flat", "flat_out", "in_shape", "lead_shape", "starts", "ends", "width", "out_shape"))
        constants = {flat_shape: [-1, f], starts: [0], ends: [-1], width: [n]}
        qdq, flat_seen = edit.quantize_activation(flat, weight.activation)
        gemm = helper.make_node("Gemm", [flat_seen, deq], [flat_out], transB=1, name=node.name)
        return Lowered(nodes + [
            helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))
            for name, v in constants.items()
        ] + [
            helper.make_node("Reshape", [node.input[0], flat_shape], [flat]),
            *qdq,
            gemm,
            *_offsets(gemm, weight, edit),
            helper.make_node("Shape", [node.input[0]], [shape]),
            helper.make_node("Slice", [shape, starts, ends], [lead]),
            helper.make_node("Concat", [lead, width], [out_shape], axis=0),
            helper.make_node("Reshape", [flat_out, out_shape], [node.output[0]]),
        ], renames)


def _offsets(gemm: onnx.NodeProto, weight: QuantizedWeight, edit: GraphEdit) -> list[onnx.NodeProto]:
    """The float zero points' correction after the Gemm, if the weight has them (gain 1)."""
    return [] if weight.weight.offset is None else edit.subtract_offsets(gemm, weight.weight, 1.0)


def _constant_add(output: str, index: GraphIndex) -> onnx.NodeProto | None:
    """The Add that alone reads ``output`` and adds a constant to it, if there is one."""
    reader = index.only_reader(output)
    if reader is None or reader.op_type != "Add":
        return None
    other = [t for t in reader.input if t != output]
    return reader if len(other) == 1 and other[0] in index.initializers else None
