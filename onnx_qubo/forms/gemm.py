"""``Gemm(x, B, C)`` with a constant weight: ``y = alpha * x B' + beta * C``.

Found for any transB, alpha != 0, beta and optional C, with transA=0. The weight maps to
[n_out, f_in] as B when transB=1, else as B^T; alpha is the layer's gain, beta * C its bias.
Lowered to ``DequantizeLinear -> Gemm(transB=1)`` (weight as rows: backends/portable.py rule 1), the
dequantized bias (if any) as C with beta 1, or added after the Gemm where backends/portable.py says so.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..backends import portable
from ..core.types import DenseLayer
from ..passes.insert_dequantize import GraphEdit, Lowered, QuantizedWeight
from .base import HALF_OR_FLOAT_WEIGHTS, LAST_AXIS, GraphIndex, Skip, as_float64, attributes, transposed


class GemmForm:
    op_type = "Gemm"

    def match(self, node: onnx.NodeProto, name: str, index: GraphIndex) -> DenseLayer | Skip:
        attrs = attributes(node)
        if attrs.get("transA", 0):
            return Skip("transA=1 (the activation is transposed); only transA=0 is supported")
        activation, weight_name = node.input[0], node.input[1]
        init = index.constant_weight(activation, weight_name, types=HALF_OR_FLOAT_WEIGHTS)
        if isinstance(init, Skip):
            return init
        gain = float(attrs.get("alpha", 1.0))
        if gain == 0.0:
            return Skip("alpha=0: the weight does not contribute to the output")
        trans_b = attrs.get("transB", 0)
        rows, columns = init.dims
        n, f = (rows, columns) if trans_b else (columns, rows)
        weight = index.weight_values(init, as_float64 if trans_b else transposed, (n, f))
        bias_name = node.input[2] if len(node.input) > 2 else ""
        bias = index.bias_vector(bias_name, n, rank=2, float_type=init.data_type)
        if isinstance(bias, Skip):
            return bias
        return DenseLayer(name, self, f"Gemm(transB={trans_b})", activation, index.ranks.get(activation),
                          weight_name, weight, gain, None if bias is None else float(attrs.get("beta", 1.0)) * bias,
                          bias_name if bias is not None else None, bias_in_node=bool(bias_name), view=LAST_AXIS,
                          float_type=init.data_type)

    def lower(self, node: onnx.NodeProto, weight: QuantizedWeight, edit: GraphEdit) -> Lowered:
        if weight.fast is not None:  # alpha and the bias are in the kernel (kernels.py)
            return edit.fast(weight, node.input[0], node.output[0])
        nodes, deq = edit.dequantize(weight.name, weight.weight)
        bias_input, bias_after = None, None
        if weight.bias is not None and weight.bias_name is not None:
            bias_nodes, bias_deq = edit.dequantize(weight.bias_name, weight.bias)
            nodes += bias_nodes
            if portable.int32_bias_after_gemm(weight.weight.storage_type, weight.bias.storage_type):
                bias_after = bias_deq
            else:
                bias_input = bias_deq
        elif weight.float_bias is not None and weight.bias_name is not None:  # beta folded in: C' = beta C + shift
            bias_input = edit.constant(f"{weight.bias_name}_corrected", weight.float_bias)
        elif weight.activation is not None and len(node.input) > 2 and node.input[2]:
            bias_after = portable.float_bias_after_quantized_gemm(node, edit)
        qdq, activation = edit.quantize_activation(node.input[0], weight.activation)
        gemm = onnx.NodeProto()
        gemm.CopyFrom(node)
        gemm.input[0], gemm.input[1] = activation, deq
        replaced = {"transB"} | ({"beta"} if bias_input is not None or bias_after is not None else set())
        kept = [a for a in gemm.attribute if a.name not in replaced]
        del gemm.attribute[:]
        gemm.attribute.extend(kept + [helper.make_attribute("transB", 1)])
        if bias_input is not None:
            gemm.input[2] = bias_input
        if bias_after is not None:
            del gemm.input[2:]
        nodes += qdq + [gemm]
        if weight.weight.offset is not None:  # float zero points (alpha scales them too)
            nodes += edit.subtract_offsets(gemm, weight.weight, float(attributes(node).get("alpha", 1.0)))
        if bias_after is not None:
            nodes += edit.add_to_output(nodes, bias_after, "bias")
        return Lowered(nodes)
