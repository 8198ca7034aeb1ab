"""From each layer's integers to the graph: the pass records, and the passes that write them.

``rewrite`` raises the opset as the integer types and the scheme require, inserts the
DequantizeLinear form of every layer (each layer's form rewrites its own node: forms/), and
checks the result with onnx's full checker.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from .grid import Granularity
from .passes import (
    ActivationQuantization,
    CheckModel,
    InsertDequantize,
    QuantizedTensor,
    QuantizedWeight,
    RaiseOpset,
    run_passes,
)
from .types import QuantizedLayer

log = logging.getLogger(__name__)


def rewrite(model: onnx.ModelProto, quantized: list[QuantizedLayer]) -> onnx.ModelProto:
    """Integer initializers + DequantizeLinear in place of the float weights, checked."""
    weights = [quantized_weight(q) for q in quantized]
    for q in quantized:
        log.info("layer '%s' (%s): %s weights, lowered by %s", q.layer.name, q.layer.label,
                 onnx.TensorProto.DataType.Name(q.scheme.grid.storage[0]), type(q.layer.form).__name__)
    target_opset = max(q.scheme.opset for q in quantized)
    return run_passes(model, [RaiseOpset(target_opset), InsertDequantize(weights), CheckModel()]).model


def quantized_weight(q: QuantizedLayer) -> QuantizedWeight:
    """The graph pass's view of a layer: scales shaped as DequantizeLinear takes them."""
    scales, scheme = q.scales, q.scheme
    if scheme.granularity == Granularity.TENSOR:
        scale, zero_point = scales.scale[0, 0], scales.zero_point[0, 0]
    elif scheme.granularity == Granularity.CHANNEL:
        scale, zero_point = scales.scale[:, 0], scales.zero_point[:, 0]
    else:
        scale, zero_point = scales.scale, scales.zero_point
    weight = QuantizedTensor(q.integers, np.asarray(scale), None if scheme.symmetric else np.asarray(zero_point),
                             scheme.grid.storage[0], scales.width if scheme.granularity == Granularity.BLOCK else 0)
    bias = None
    if q.bias is not None:
        bias = QuantizedTensor(q.bias.integers, q.bias.scale,
                               np.full(q.bias.scale.shape, q.bias.zero_point) if q.bias.zero_point else None,
                               q.bias.storage)
    activation = None
    if q.input_quantizer is not None:
        activation = ActivationQuantization(q.input_quantizer.scale, q.input_quantizer.zero_point,
                                            q.input_quantizer.storage)
    return QuantizedWeight(q.layer.weight_name, weight, q.layer.form, q.layer.input_rank, q.bias_shift,
                           q.layer.bias_name if bias is not None else None, bias, activation)
