"""Replace float dense weights by integer initializers feeding DequantizeLinear.

Every quantized weight is stored as [n_out, f_in] integers with a scale and zero point per
tensor, per output row (``axis=0``) or per block of inputs within a row (``axis=1``,
``block_size``), dequantized by ``DequantizeLinear`` and consumed by ``Gemm(transB=1)``.
That is the form onnxruntime runs exactly at every optimization level: at its default level
it rewrites ``DequantizeLinear(axis=1) -> MatMul`` (and a DQ followed by a Transpose, or a
per-tensor DQ into MatMul) into its MatMulNBits kernel, which quantizes activations to 8 bits
and, for INT2 weights whose output width is not a multiple of 4, returns wrong numbers. So:

- ``Gemm`` keeps its node and gets ``transB=1``;
- ``MatMul`` on 2-D activations becomes ``Gemm(transB=1)``;
- ``MatMul`` on N-D activations becomes ``Reshape [-1, f] -> Gemm(transB=1) -> Reshape``
  back to the activation's leading axes plus n.

Optionally, per weight:

- ``activation``: ``QuantizeLinear -> DequantizeLinear`` (per tensor, 8 bits) on the node's
  activation input;
- ``bias``: the bias initializer (Gemm's C, or the constant of the Add after a MatMul)
  becomes integers feeding a ``DequantizeLinear``; Gemm's beta is then 1 (the integers hold
  the effective bias). Trap: onnxruntime 1.32 fuses DQ(activation), DQ(weight) and a
  DQ(INT32 bias) on Gemm's C into QGemm without checking the weight type, and fails to load
  the model for INT2/UINT2 weights; such a bias is added by an ``Add`` after the Gemm instead;
- ``output_shift`` (bias correction): an ``Add`` of that [n] vector follows, so the node's
  existing bias, whatever its form, is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .base import PassResult, copy_model

TWO_BIT_TYPES = (TensorProto.INT2, TensorProto.UINT2)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Integers as DequantizeLinear reads them: ``(integers - zero_point) * scale``."""

    integers: np.ndarray
    scale: np.ndarray  # () per tensor, [n] along axis 0, or [n, g] blocks along axis 1
    zero_point: np.ndarray | None  # integers, the shape of scale; None: 0 (no zero-point input)
    storage_type: int  # onnx.TensorProto.INT2 / UINT4 / INT32 ...
    block_size: int = 0  # with a 2-D scale: inputs per block

    def attributes(self) -> dict:
        if self.scale.ndim == 0:
            return {}
        if self.scale.ndim == 1:
            return {"axis": 0}
        return {"axis": 1, "block_size": self.block_size}


@dataclass(frozen=True)
class ActivationQuantization:
    """Per-tensor 8-bit quantization of a layer's activation input."""

    scale: float
    zero_point: int
    storage_type: int  # INT8 or UINT8


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Integer weights [n_out, f_in] for the single node that reads initializer ``name``."""

    name: str
    weight: QuantizedTensor
    activation_rank: int | None  # rank of the node's activation input, None when unknown
    output_shift: np.ndarray | None = None  # [n_out] added to the node's output (bias correction)
    bias_name: str | None = None  # the bias initializer that ``bias`` replaces
    bias: QuantizedTensor | None = None  # [n_out]
    activation: ActivationQuantization | None = None


class InsertDequantize:
    def __init__(self, weights: list[QuantizedWeight]):
        self.weights = weights

    def call(self, model: onnx.ModelProto) -> PassResult:
        if not self.weights:
            return PassResult(model, modified=False)
        out = copy_model(model)
        graph = out.graph
        names = _Names(graph)
        replacements: dict[int, list[onnx.NodeProto]] = {}
        renames: dict[str, str] = {}
        dropped = {w.name for w in self.weights} | {w.bias_name for w in self.weights if w.bias is not None}
        for weight in self.weights:
            index = _only_reader(graph, weight.name)
            node = graph.node[index]
            nodes, deq = _dequantize(graph, names, weight.name, weight.weight)
            bias_input, bias_after = None, None
            if weight.bias is not None:
                bias_nodes, bias_deq = _dequantize(graph, names, weight.bias_name, weight.bias)
                nodes += bias_nodes
                if node.op_type != "Gemm":
                    renames[weight.bias_name] = bias_deq  # the constant operand of the Add after
                elif weight.bias.storage_type == TensorProto.INT32 and weight.weight.storage_type in TWO_BIT_TYPES:
                    bias_after = bias_deq
                else:
                    bias_input = bias_deq
            nodes += _dense_nodes(graph, node, deq, weight, bias_input, bias_after is not None, names)
            if bias_after is not None:
                nodes += _add_to_output(nodes, bias_after, "bias", names)
            if weight.output_shift is not None:
                shift = names.fresh(f"{nodes[-1].output[0]}_shift")
                graph.initializer.append(numpy_helper.from_array(weight.output_shift.astype(np.float32), shift))
                nodes += _add_to_output(nodes, shift, "bias_correction", names)
            replacements[index] = nodes

        nodes = []
        for i, node in enumerate(graph.node):
            nodes.extend(replacements.get(i, [node]))
        for node in nodes:
            for k, name in enumerate(node.input):
                if name in renames:
                    node.input[k] = renames[name]
        del graph.node[:]
        graph.node.extend(nodes)
        _remove(graph.initializer, dropped)
        _remove(graph.input, dropped)
        _remove(graph.value_info, dropped)
        return PassResult(out, modified=True)


def _dequantize(graph, names: "_Names", base: str, tensor: QuantizedTensor) -> tuple[list[onnx.NodeProto], str]:
    """Initializers for ``tensor`` and the DequantizeLinear reading them; returns its output."""
    q, scale, zero_point, deq = (names.fresh(f"{base}_{suffix}") for suffix in
                                 ("quantized", "scale", "zero_point", "dequantized"))
    storage = helper.tensor_dtype_to_np_dtype(tensor.storage_type)  # ml_dtypes int2/int4
    graph.initializer.extend([  # from_array packs sub-byte types into raw_data
        numpy_helper.from_array(tensor.integers.astype(storage), q),
        numpy_helper.from_array(np.asarray(tensor.scale, np.float32), scale),
    ])
    inputs = [q, scale]
    if tensor.zero_point is not None:
        graph.initializer.append(numpy_helper.from_array(np.asarray(tensor.zero_point).astype(storage), zero_point))
        inputs.append(zero_point)
    node = helper.make_node("DequantizeLinear", inputs, [deq],
                            name=names.fresh(f"{base}_DequantizeLinear"), **tensor.attributes())
    return [node], deq


def _quantize_activation(graph, names: "_Names", activation: str,
                         quant: ActivationQuantization) -> tuple[list[onnx.NodeProto], str]:
    """QuantizeLinear -> DequantizeLinear on ``activation``; returns the nodes and the new input."""
    scale, zero_point, quantized, deq = (names.fresh(f"{activation}_{suffix}") for suffix in
                                         ("scale", "zero_point", "quantized", "dequantized"))
    graph.initializer.extend([
        numpy_helper.from_array(np.array(quant.scale, np.float32), scale),
        numpy_helper.from_array(np.array(quant.zero_point, helper.tensor_dtype_to_np_dtype(quant.storage_type)),
                                zero_point),
    ])
    return [
        helper.make_node("QuantizeLinear", [activation, scale, zero_point], [quantized],
                         name=names.fresh(f"{activation}_QuantizeLinear")),
        helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [deq],
                         name=names.fresh(f"{activation}_DequantizeLinear")),
    ], deq


def _dense_nodes(graph, node: onnx.NodeProto, deq: str, weight: QuantizedWeight, bias_input: str | None,
                 drop_bias: bool, names: "_Names") -> list[onnx.NodeProto]:
    """The node(s) that replace ``node``, reading the dequantized weight as Gemm's B (and, for a
    Gemm, ``bias_input`` as its C, or no C when ``drop_bias``). A quantized activation gets its
    QuantizeLinear -> DequantizeLinear right before the Gemm (after any flattening Reshape:
    onnxruntime 1.32 mistypes a signed QDQ it moves across a Reshape)."""
    output = node.output[0]

    def quantized(activation: str) -> tuple[list[onnx.NodeProto], str]:
        if weight.activation is None:
            return [], activation
        return _quantize_activation(graph, names, activation, weight.activation)

    if node.op_type == "Gemm":
        qdq, activation = quantized(node.input[0])
        gemm = onnx.NodeProto()
        gemm.CopyFrom(node)
        gemm.input[0], gemm.input[1] = activation, deq
        replaced = {"transB"} | ({"beta"} if bias_input or drop_bias else set())
        kept = [a for a in gemm.attribute if a.name not in replaced]
        del gemm.attribute[:]
        gemm.attribute.extend(kept + [helper.make_attribute("transB", 1)])
        if bias_input is not None:
            gemm.input[2] = bias_input
        if drop_bias:
            del gemm.input[2:]
        return qdq + [gemm]
    if weight.activation_rank == 2:
        qdq, activation = quantized(node.input[0])
        return qdq + [helper.make_node("Gemm", [activation, deq], [output], transB=1, name=node.name)]

    n, f = weight.weight.integers.shape
    prefix = node.name or weight.name
    flat_shape, flat, flat_out, shape, lead, starts, ends, width, out_shape = (
        names.fresh(f"{prefix}_{suffix}") for suffix in
        ("flat_shape", "flat", "flat_out", "in_shape", "lead_shape", "starts", "ends", "width", "out_shape"))
    constants = {flat_shape: [-1, f], starts: [0], ends: [-1], width: [n]}
    qdq, flat_seen = quantized(flat)
    return [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))
        for name, v in constants.items()
    ] + [
        helper.make_node("Reshape", [node.input[0], flat_shape], [flat]),
        *qdq,
        helper.make_node("Gemm", [flat_seen, deq], [flat_out], transB=1, name=node.name),
        helper.make_node("Shape", [node.input[0]], [shape]),
        helper.make_node("Slice", [shape, starts, ends], [lead]),
        helper.make_node("Concat", [lead, width], [out_shape], axis=0),
        helper.make_node("Reshape", [flat_out, out_shape], [output]),
    ]


def _add_to_output(nodes: list[onnx.NodeProto], addend: str, label: str, names: "_Names") -> list[onnx.NodeProto]:
    """Rename the last node's output and add ``addend`` to it under the original name."""
    output = nodes[-1].output[0]
    before = names.fresh(f"{output}_before_{label}")
    nodes[-1].output[0] = before
    return [helper.make_node("Add", [before, addend], [output], name=names.fresh(f"{output}_{label}"))]


def _only_reader(graph: onnx.GraphProto, tensor: str) -> int:
    readers = [i for i, node in enumerate(graph.node) if tensor in node.input]
    if len(readers) != 1:
        raise ValueError(f"initializer '{tensor}' is read by {len(readers)} nodes; expected exactly one")
    node = graph.node[readers[0]]
    if node.op_type not in ("Gemm", "MatMul") or list(node.input).index(tensor) != 1:
        raise ValueError(f"initializer '{tensor}' is not the weight (input B) of a Gemm or MatMul")
    return readers[0]


def _remove(container, names: set[str]) -> None:
    kept = [item for item in container if item.name not in names]
    del container[:]
    container.extend(kept)


class _Names:
    """Hands out tensor/node names that do not clash with any already in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {init.name for init in graph.initializer}
        self.used |= {v.name for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
        for node in graph.node:
            self.used |= set(node.input) | set(node.output) | {node.name}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name
