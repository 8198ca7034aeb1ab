"""``Conv(x, W, B)`` with a constant weight ``W [M, C, k1..kd]`` (1-3 spatial axes, any strides,
pads, dilations, auto_pad; one group): a dense layer over the im2col patches of its input.

The weight maps to [n_out, f_in] = [M, C * k1..kd] (patches.py: channel, then kernel offsets
row-major); calibration streams the patch Gram (one input vector per output position); the
bias is ``B``. Lowered to ``DequantizeLinear`` on the [M, f] integers (any granularity, as for
the dense forms) -> ``Reshape`` to the weight's shape -> ``Conv``: exact at every onnxruntime
level (tests/test_conv.py). A grouped or depthwise Conv is solved as one layer per group (each
group has its own Gram matrix; pipeline.split_groups), its groups merged again for the rewrite.
With format ort and quantized inputs, onnxruntime's QLinearConv may run it instead
(backends/ort_conv.py, chosen by backends/kernels.py), which also quantizes its output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Mapping

import numpy as np
import onnx
from onnx import helper

from ..calibration.grams import ConvGram
from ..calibration.patches import flatten_weight
from ..core.types import Accumulator, DenseLayer
from ..core.views import ConvGeometry
from ..passes.insert_dequantize import GraphEdit, Lowered, QuantizedWeight
from .base import GraphIndex, Skip, attributes


@dataclass(frozen=True)
class Patches:
    """A Conv's input view (``types.InputView``): its im2col patches, one vector per output
    position, one layer problem per group; ``output``: the Conv's output tensor, whose range is
    calibrated when QLinearConv may run it."""

    geometry: ConvGeometry
    output: str
    tensors: tuple[str, ...] = ()
    unwritten = None
    positions = False  # patches, not the input's positions: a padding mask does not apply

    @property
    def problems(self) -> int:
        return self.geometry.groups

    @property
    def small_problems(self) -> bool:
        return self.geometry.groups > 1

    @property
    def output_axes(self) -> int:
        return len(self.geometry.kernel)

    def source(self, input_name: str, owner: str) -> str:
        return f"{input_name}#patches:{owner}"

    def accumulator(self, features: int, drift: bool, owner: str, spread: bool = False) -> Accumulator:
        return ConvGram(self.geometry, drift, owner, spread)

    def vectors(self, x: np.ndarray, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        return x  # the input itself: ConvGram cuts it into patches a chunk at a time


def flat_float64(stored: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """A Conv's stored weight as [M, f] float64."""
    return flatten_weight(stored.astype(np.float64), geometry)


class ConvForm:
    op_type = "Conv"

    def match(self, node: onnx.NodeProto, name: str, index: GraphIndex) -> DenseLayer | Skip:
        activation, weight_name = node.input[0], node.input[1]
        init = index.constant_weight(activation, weight_name, rank=None)
        if isinstance(init, Skip):
            return init
        if not 3 <= len(init.dims) <= 5:
            return Skip(f"weight '{weight_name}' has rank {len(init.dims)}; a Conv over 1-3 spatial axes has 3-5")
        try:
            geometry = ConvGeometry.from_attributes(attributes(node), tuple(init.dims))
        except ValueError as exc:
            return Skip(f"Conv attributes: {exc}")
        weight = index.weight_values(init, partial(flat_float64, geometry=geometry),
                                     (geometry.out_channels, geometry.features))
        bias_name = node.input[2] if len(node.input) > 2 else ""
        bias = index.bias_vector(bias_name, geometry.out_channels, rank=1)  # Conv's B is [M]
        if isinstance(bias, Skip):
            return bias
        return DenseLayer(name, self, f"Conv {'x'.join(map(str, geometry.kernel))}", activation,
                          index.ranks.get(activation), weight_name, weight, 1.0, bias,
                          bias_name if bias is not None else None, bias_in_node=bool(bias_name),
                          view=Patches(geometry, node.output[0]))

    def lower(self, node: onnx.NodeProto, weight: QuantizedWeight, edit: GraphEdit) -> Lowered:
        if weight.fast is not None:  # QLinearConv: the bias and its correction are in its INT32 B (kernels.py)
            return edit.fast(weight, node.input[0], node.output[0])
        nodes, deq = edit.dequantize(weight.name, weight.weight)
        stored = next(init for init in edit.graph.initializer if init.name == weight.name)
        shape = edit.constant(f"{weight.name}_shape", np.array(stored.dims, np.int64))
        reshaped = edit.fresh(f"{weight.name}_reshaped")
        nodes.append(helper.make_node("Reshape", [deq, shape], [reshaped], name=edit.fresh(f"{weight.name}_Reshape")))
        qdq, activation = edit.quantize_activation(node.input[0], weight.activation)
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        conv.input[0], conv.input[1] = activation, reshaped
        if weight.bias is not None and weight.bias_name is not None:
            bias_nodes, conv.input[2] = edit.dequantize(weight.bias_name, weight.bias)
            nodes += bias_nodes
        elif weight.float_bias is not None and weight.bias_name is not None:
            conv.input[2] = edit.constant(f"{weight.bias_name}_corrected", weight.float_bias)
        elif weight.output_shift is not None and (len(conv.input) < 3 or not conv.input[2]):
            # no bias: the correction becomes Conv's B, not an Add after it
            del conv.input[2:]
            conv.input.append(edit.constant(f"{weight.name}_bias_correction",
                                            weight.output_shift.reshape(-1).astype(np.float32)))
            return Lowered(nodes + qdq + [conv], shift_folded=True)
        return Lowered(nodes + qdq + [conv])
