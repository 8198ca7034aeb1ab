"""The portable (QDQ) form under onnxruntime (1.32, CPU provider): what its optimizer computes
wrongly or refuses on ``DequantizeLinear`` graphs, and how the portable form stays clear of it.

Every rule here was found by running an emitted form at onnxruntime's default and basic
optimization levels against numpy; each has a test (tests/test_passes.py, tests/test_schemes.py).
The forms (forms/) and the options ask this module instead of knowing the rules; the rules of
onnxruntime's own kernels (format ort) are in ort.py, ort_conv.py and kernels.py.

1. ``DequantizeLinear(axis=1) -> MatMul`` (also ``-> Gemm`` reading the weight as [f_in, n_out],
   through a ``Transpose``, or a per-tensor DQ into ``MatMul``) is rewritten at the default level
   into the MatMulNBits kernel, which quantizes activations to 8 bits (~0.5% output error) and
   returns wrong numbers for INT2 weights whose output width is not a multiple of 4. The
   weight-as-rows ``DequantizeLinear(axis=0 or blocks on axis=1) -> Gemm(transB=1)`` is computed
   exactly at every level: every dense form lowers to it (forms/).
2. With quantized inputs, ``DequantizeLinear``s around a ``Gemm`` followed by a
   ``QuantizeLinear`` are fused into QGemm without checking for INT2/UINT2 weights when the
   weight's DQ has a zero-point input, and the model then cannot be loaded. Hence symmetric
   weights carry no zero-point input (``weight_zero_point_input``), an INT32 bias of a 2-bit
   layer is added by an ``Add`` after the Gemm (``int32_bias_after_gemm``), and asymmetric
   1-2 bit weights per channel or tensor with quantized inputs are refused (``scheme_refusal``).
3. A signed ``QuantizeLinear`` moved across a ``Reshape`` gets mistyped, so an N-D layer's input
   is quantized after the flattening ``Reshape`` (forms/matmul.py).
4. With quantized inputs, a ``Gemm`` whose output is quantized again (through a Relu, by the next
   layer's QuantizeLinear) is fused into QGemm at the basic level and above, re-quantizing its
   float bias ``C`` to INT32 (0.5% of the largest output on the digits demo, seen by the report's
   comparison with optimizations disabled); so a float bias is added by an ``Add`` after the
   Gemm there (``float_bias_after_quantized_gemm``).
5. ``Gather`` does not take INT4/INT2 tensors, so a portable table lookup reads codes packed in
   bytes (forms/gather.py).
6. ``DequantizeLinear`` takes only integer zero points (the ONNX standard), so float zero points
   (``--float-zero-points``) are written as ``DequantizeLinear`` without one, and the offsets
   ``scale * zero_point`` are subtracted on the activation's side: the Gemm's output less the
   input's block sums times the offsets (``GraphEdit.subtract_offsets``). Subtracting them from
   the dequantized weight instead makes onnxruntime fold the weight to floats when it loads the
   model (measured on MiniLM at 3 bits: 258 MB resident against 155 MB with integer zero points
   and 188 MB for the float model). Only the dense forms that lower to ``Gemm`` get them
   (``takes_float_zero_points``); MatMulNBits takes them but has no fast kernel for them (ort.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..core.grid import Granularity, InputQuantizer, Scheme, WeightCodes
from ..core.types import DenseLayer, QuantizedBias
from ..passes.insert_dequantize import ActivationQuantization, GraphEdit, QuantizedTensor
from ..passes.packed_codes import packs

TWO_BIT_TYPES = (TensorProto.INT2, TensorProto.UINT2)


def scheme_refusal(scheme: Scheme, quantized_inputs: bool) -> str | None:
    """Why onnxruntime cannot load a model with this weight scheme, or None (rule 2)."""
    if (quantized_inputs and scheme.bits <= 2 and not scheme.symmetric
            and scheme.granularity != Granularity.BLOCK):
        return ("asymmetric 1-2 bit weights per channel or tensor with quantized inputs ({activations}): "
                "onnxruntime 1.32 fuses them into QGemm, which rejects UINT2, and cannot load the model; use "
                "{symmetric} weights, {granularity} block, or more bits")
    return None


FLOAT_ZERO_POINT_FORMS = ("MatMul", "Gemm")  # 2-D weights lowered to DequantizeLinear -> Gemm(transB=1)


def takes_float_zero_points(layer: DenseLayer) -> bool:
    """Whether the layer's form writes float zero points (rule 6; MatMulNBits reads them too):
    the others keep integer ones."""
    return layer.form.op_type in FLOAT_ZERO_POINT_FORMS and layer.group is None


def weight_zero_point_input(symmetric: bool) -> bool:
    """Whether a weight's DequantizeLinear gets a zero-point input (rule 2: not when it is 0)."""
    return not symmetric


def int32_bias_after_gemm(weight_type: int, bias_type: int) -> bool:
    """Whether a quantized bias must be added after the Gemm rather than fed as its C (rule 2)."""
    return bias_type == TensorProto.INT32 and weight_type in TWO_BIT_TYPES


def float_bias_after_quantized_gemm(gemm: onnx.NodeProto, edit: GraphEdit) -> str | None:
    """The tensor to add after ``gemm`` instead of its float C, beta folded in (rule 4): C itself
    when beta is 1, else a constant beta * C; None (C stays) when C is computed and beta is not 1."""
    beta = next((helper.get_attribute_value(a) for a in gemm.attribute if a.name == "beta"), 1.0)
    bias = gemm.input[2]
    if beta == 1.0:
        return bias
    initializer = next((i for i in edit.graph.initializer if i.name == bias), None)
    if initializer is None:
        return None
    return edit.constant(f"{bias}_times_beta", (beta * edit.read(initializer)).astype(np.float32))



def weight_tensor(codes: WeightCodes, packed: bool = False) -> QuantizedTensor:
    """The codes as ``DequantizeLinear`` reads them (the graph pass's view): a scale per tensor (a
    scalar), per row (``axis=0``) or per block of inputs (``axis=1``, ``block_size``), a zero-point
    input only on the unsigned grid (rule 2); with ``packed``, codes narrower than their storage
    type at their own width (passes/packed_codes.py)."""
    scheme, scales = codes.scheme, codes.scales
    packed_bits = scheme.bits if packed and packs(scheme.bits, scheme.grid.storage[0], codes.integers.size) else 0
    if scheme.granularity == Granularity.TENSOR:
        scale, zero_point = scales.scale[0, 0], scales.zero_point[0, 0]
    elif scheme.granularity == Granularity.CHANNEL:
        scale, zero_point = scales.scale[:, 0], scales.zero_point[:, 0]
    else:
        scale, zero_point = scales.scale, scales.zero_point
    block = scales.width if scheme.granularity == Granularity.BLOCK else 0
    if scheme.float_zero_point:  # rule 6
        stored = np.asarray(scale, scheme.scale_dtype)
        return QuantizedTensor(codes.integers, stored, None, scheme.grid.storage[0], block,
                               offset=(stored.astype(np.float64) * zero_point).astype(scheme.scale_dtype),
                               packed_bits=packed_bits)
    return QuantizedTensor(codes.integers, np.asarray(scale, scheme.scale_dtype),
                           np.asarray(zero_point) if weight_zero_point_input(scheme.symmetric) else None,
                           scheme.grid.storage[0], block, packed_bits=packed_bits)


def bias_tensor(bias: QuantizedBias, scale_dtype: type[np.floating] = np.float32) -> QuantizedTensor:
    """A quantized bias as ``DequantizeLinear`` reads it (a zero-point input only when one is not 0;
    its scale in the weights' ``scale_dtype``, which is the type it dequantizes to)."""
    zero_point = np.broadcast_to(bias.zero_point, bias.scale.shape) if np.any(bias.zero_point) else None
    return QuantizedTensor(bias.integers, np.asarray(bias.scale, scale_dtype), zero_point, bias.storage)


def activation_quantization(quantizer: InputQuantizer) -> ActivationQuantization:
    """An input quantizer as the graph pass writes it (``QuantizeLinear -> DequantizeLinear``)."""
    return ActivationQuantization(quantizer.scale, quantizer.zero_point, quantizer.storage)
