"""Replace float dense weights by integer initializers feeding DequantizeLinear.

Every quantized weight is stored as [n_out, f_in] integers with a per-row float scale and a
zero point, dequantized with ``DequantizeLinear(axis=0)`` and consumed by ``Gemm(transB=1)``.
That is the one form onnxruntime runs exactly at every optimization level: at its default
level it rewrites ``DequantizeLinear(axis=1) -> MatMul/Gemm`` (and a DQ followed by a
Transpose) into its MatMulNBits kernel, which quantizes activations to 8 bits and, for INT2
weights whose output width is not a multiple of 4, returns wrong numbers. So:

- ``Gemm`` keeps its node and gets ``transB=1``;
- ``MatMul`` on 2-D activations becomes ``Gemm(transB=1)``;
- ``MatMul`` on N-D activations becomes ``Reshape [-1, f] -> Gemm(transB=1) -> Reshape``
  back to the activation's leading axes plus n.

With an ``output_shift`` (bias correction), an ``Add`` of that [n] vector follows, so the
node's existing bias, whatever its form, is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .base import PassResult, copy_model


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Integer weights for the single node that reads initializer ``name``."""

    name: str
    integers: np.ndarray  # [n_out, f_in]
    scale: np.ndarray  # [n_out], positive
    storage_type: int  # onnx.TensorProto.INT2 / INT4 / INT8 ...
    activation_rank: int | None  # rank of the node's activation input, None when unknown
    output_shift: np.ndarray | None = None  # [n_out] added to the node's output (bias correction)


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
        dropped = {w.name for w in self.weights}
        for weight in self.weights:
            index = _only_reader(graph, weight.name)
            q, scale, zero_point, deq = (names.fresh(f"{weight.name}_{suffix}") for suffix in
                                         ("quantized", "scale", "zero_point", "dequantized"))
            storage = helper.tensor_dtype_to_np_dtype(weight.storage_type)  # ml_dtypes int2/int4
            graph.initializer.extend([  # from_array packs sub-byte types into raw_data
                numpy_helper.from_array(weight.integers.astype(storage), q),
                numpy_helper.from_array(weight.scale.astype(np.float32), scale),
                numpy_helper.from_array(np.zeros(len(weight.integers), storage), zero_point),
            ])
            dq = helper.make_node("DequantizeLinear", [q, scale, zero_point], [deq], axis=0,
                                  name=names.fresh(f"{weight.name}_DequantizeLinear"))
            nodes = [dq] + _dense_nodes(graph.node[index], deq, weight, names)
            if weight.output_shift is not None:
                nodes += _shift_output(nodes, graph, weight.output_shift.astype(np.float32), names)
            replacements[index] = nodes

        nodes = []
        for i, node in enumerate(graph.node):
            nodes.extend(replacements.get(i, [node]))
        del graph.node[:]
        graph.node.extend(nodes)
        _remove(graph.initializer, dropped)
        _remove(graph.input, dropped)
        _remove(graph.value_info, dropped)
        return PassResult(out, modified=True)


def _dense_nodes(node: onnx.NodeProto, deq: str, weight: QuantizedWeight,
                 names: "_Names") -> list[onnx.NodeProto]:
    """The node(s) that replace ``node``, reading the dequantized weight as Gemm's B."""
    activation, output = node.input[0], node.output[0]
    if node.op_type == "Gemm":
        gemm = onnx.NodeProto()
        gemm.CopyFrom(node)
        gemm.input[1] = deq
        kept = [a for a in gemm.attribute if a.name != "transB"]
        del gemm.attribute[:]
        gemm.attribute.extend(kept + [helper.make_attribute("transB", 1)])
        return [gemm]
    if weight.activation_rank == 2:
        return [helper.make_node("Gemm", [activation, deq], [output], transB=1, name=node.name)]

    n, f = weight.integers.shape
    prefix = node.name or weight.name
    flat_shape, flat, flat_out, shape, lead, starts, ends, width, out_shape = (
        names.fresh(f"{prefix}_{suffix}") for suffix in
        ("flat_shape", "flat", "flat_out", "in_shape", "lead_shape", "starts", "ends", "width", "out_shape"))
    constants = {flat_shape: [-1, f], starts: [0], ends: [-1], width: [n]}
    return [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))
        for name, v in constants.items()
    ] + [
        helper.make_node("Reshape", [activation, flat_shape], [flat]),
        helper.make_node("Gemm", [flat, deq], [flat_out], transB=1, name=node.name),
        helper.make_node("Shape", [activation], [shape]),
        helper.make_node("Slice", [shape, starts, ends], [lead]),
        helper.make_node("Concat", [lead, width], [out_shape], axis=0),
        helper.make_node("Reshape", [flat_out, out_shape], [output]),
    ]


def _shift_output(nodes: list[onnx.NodeProto], graph: onnx.GraphProto, shift: np.ndarray,
                  names: "_Names") -> list[onnx.NodeProto]:
    """Rename the last node's output and add ``shift`` to it under the original name."""
    output = nodes[-1].output[0]
    unshifted, constant = names.fresh(f"{output}_unshifted"), names.fresh(f"{output}_shift")
    nodes[-1].output[0] = unshifted
    graph.initializer.append(numpy_helper.from_array(shift, constant))
    return [helper.make_node("Add", [unshifted, constant], [output], name=names.fresh(f"{output}_bias_correction"))]


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
        self.used |= {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
        for node in graph.node:
            self.used |= set(node.input) | set(node.output) | {node.name}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name
