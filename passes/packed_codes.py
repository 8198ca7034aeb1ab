"""Weight codes narrower than their ONNX storage type, written at their own width.

ONNX has integer types of 2, 4 and 8 bits only, so 1-bit codes take INT2 room, 3-bit codes INT4
room and 5-7 bit codes INT8 room: a 3-bit model is as large as a 4-bit one. Packed, the codes
take their own width in the file, and integer operators every ONNX runtime has rebuild the
storage-type tensor ``DequantizeLinear`` reads; they depend on initializers only, so onnxruntime
folds them into that tensor when it loads the model (constant folding, its basic level and
above): the session's tensors and speed are then the unpacked model's, but the folding's
intermediate tensors (about 10 bytes per code) are all held until the model is loaded, and the
memory they took stays with the process (glibc keeps the freed heap): why ``--pack-codes`` is
opt-in. With optimizations disabled they run on every call.

Layout: the codes flattened row-major as unsigned ``u = q - qmin``, split into planes of 4, 2 and
1 bits (``PLANES``: 3 = 2 + 1, 5 = 4 + 1, ...), lowest bits first; each plane is a uint8
initializer of ``8 // width`` values a byte, first value in the lowest bits, the values padded
with zeros to a multiple of 8. Unpacked: per plane ``Unsqueeze``, ``BitShift`` left (value k to
the top bits) then right (to the bottom), ``Reshape`` flat, ``BitShift`` left to its place in u,
``BitwiseOr`` of the planes; ``Slice`` to the count, ``Reshape`` to the weight's shape, ``Cast``
to INT8, ``Add`` qmin (signed codes), ``Cast`` to the storage type.

``read_codes`` reads the integers ``DequantizeLinear`` gets back out of a written graph in numpy,
whichever way they are stored: the independent reference the tests and benchmarks use;
``code_initializers`` names the initializers they are stored in and ``code_shape`` gives their
shape (a size count's).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PLANES = {1: (1,), 3: (2, 1), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1)}  # code width -> plane widths, low bits first
STORAGE_BITS: dict[int, int] = {TensorProto.INT2: 2, TensorProto.UINT2: 2, TensorProto.INT4: 4,
                                 TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8}
PACKING_OPSET = 18  # BitwiseOr
UNPACKING_BYTES = 2048  # what one weight's unpacking nodes and constants take in the file, about
UNPACK_OPS = ("Unsqueeze", "BitShift", "Reshape", "BitwiseOr", "Slice", "Cast", "Add")


def packs(bits: int, storage_type: int, count: int) -> bool:
    """Whether ``count`` codes of ``bits`` bits stored as ``storage_type`` take less room packed,
    the unpacking nodes counted (a small layer's codes stay as they are)."""
    saved = count * (STORAGE_BITS.get(storage_type, 0) - bits) // 8
    return bits in PLANES and saved > UNPACKING_BYTES


def pack_planes(integers: np.ndarray, bits: int, qmin: int) -> list[np.ndarray]:
    """The uint8 planes of ``integers`` (``bits``-bit codes from ``qmin``), as the module's layout."""
    unsigned = (integers.astype(np.int64) - qmin).reshape(-1)
    if unsigned.size and (unsigned.min() < 0 or unsigned.max() >= 1 << bits):
        raise ValueError(f"codes outside the {bits}-bit grid from {qmin}")
    padded = np.zeros(-(-unsigned.size // 8) * 8, np.uint8)
    padded[:unsigned.size] = unsigned
    planes, shift = [], 0
    for width in PLANES[bits]:
        values = (padded >> shift) & ((1 << width) - 1)
        per_byte = 8 // width
        shifts = (np.arange(per_byte) * width).astype(np.uint8)
        planes.append(np.bitwise_or.reduce(values.reshape(-1, per_byte) << shifts, axis=-1).astype(np.uint8))
        shift += width
    return planes


def unpack_nodes(base: str, integers: np.ndarray, bits: int, qmin: int, storage_type: int,
                 constant: Callable[[str, np.ndarray], str], fresh: Callable[[str], str],
                 shared: Callable[[str, np.ndarray], str] | None = None) -> tuple[list[onnx.NodeProto], str]:
    """The planes of ``integers`` as initializers (``constant``) and the nodes rebuilding them as
    ``storage_type``; returns the nodes and the name of their output. ``shared``: where the
    constants every weight's unpacking uses alike (shifts, axes) are added once (default
    ``constant``)."""
    common = constant if shared is None else shared
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], **attributes: Any) -> str:
        out = fresh(f"{base}_{op.lower()}")
        nodes.append(helper.make_node(op, inputs, [out], name=fresh(f"{base}_{op}"), **attributes))
        return out

    flat = common("unpack_flat", np.array([-1], np.int64))
    unsigned, shift = "", 0
    for width, plane in zip(PLANES[bits], pack_planes(integers, bits, qmin)):
        per_byte = 8 // width
        values = node("Unsqueeze", [constant(f"{base}_packed{width}", plane), flat])
        if per_byte > 1:
            lefts = np.array([8 - width * (k + 1) for k in range(per_byte)], np.uint8)
            values = node("BitShift", [values, common(f"unpack_left{width}", lefts)], direction="LEFT")
            rights = np.full(per_byte, 8 - width, np.uint8)
            values = node("BitShift", [values, common(f"unpack_right{width}", rights)], direction="RIGHT")
        values = node("Reshape", [values, flat])
        if shift:
            values = node("BitShift", [values, common(f"unpack_place{shift}", np.array([shift], np.uint8))],
                          direction="LEFT")
        unsigned = node("BitwiseOr", [unsigned, values]) if unsigned else values
        shift += width
    count = constant(f"{base}_count", np.array([integers.size], np.int64))
    unsigned = node("Slice", [unsigned, common("unpack_start", np.array([0], np.int64)), count])
    shaped = node("Reshape", [unsigned, constant(f"{base}_shape", np.array(integers.shape, np.int64))])
    signed = node("Cast", [shaped], to=TensorProto.INT8)
    if qmin:
        signed = node("Add", [signed, common(f"unpack_from{-qmin}", np.array(qmin, np.int8))])
    return nodes, node("Cast", [signed], to=storage_type)


def read_codes(graph: onnx.GraphProto, name: str,
               read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array) -> np.ndarray:
    """The integers of tensor ``name`` (a ``DequantizeLinear``'s first input) in numpy: its
    initializer, or the unpacking nodes above it evaluated on their initializers (int64)."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    values: dict[str, np.ndarray] = {}

    def value(tensor: str) -> np.ndarray:
        if tensor not in values:
            if tensor in initializers:
                values[tensor] = np.asarray(read(initializers[tensor])).astype(np.int64)
            elif tensor in producers and producers[tensor].op_type in UNPACK_OPS:
                values[tensor] = _evaluate(producers[tensor], [value(x) for x in producers[tensor].input])
            else:
                raise ValueError(f"tensor '{tensor}' is neither an initializer nor unpacked from one")
        return values[tensor]

    return value(name)


def code_initializers(graph: onnx.GraphProto, name: str) -> list[str]:
    """The initializers holding the codes of tensor ``name`` in the file: itself, or the planes
    its unpacking nodes read (what a size count should count; not the shared shifts and axes)."""
    initializers = {tensor.name for tensor in graph.initializer}
    if name in initializers:
        return [name]
    producers = {out: node for node in graph.node for out in node.output}
    found, stack, seen = [], [name], set()
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if tensor in seen or node is None or node.op_type not in UNPACK_OPS:
            continue
        seen.add(tensor)
        if node.op_type == "Unsqueeze" and node.input[0] in initializers:
            found.append(node.input[0])
        stack.extend(node.input)
    return sorted(found)


def code_shape(graph: onnx.GraphProto, name: str) -> tuple[int, ...]:
    """The shape of tensor ``name``, codes: its initializer's, or that the unpacking nodes give
    them (their last Reshape's), without reading the codes (external data may stay unloaded)."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    tensor = name
    while tensor not in initializers:
        node = producers.get(tensor)
        if node is None or node.op_type not in UNPACK_OPS:
            raise ValueError(f"tensor '{name}' is neither an initializer nor unpacked from one")
        if node.op_type == "Reshape":
            return tuple(int(d) for d in numpy_helper.to_array(initializers[node.input[1]]))
        tensor = node.input[0]
    return tuple(initializers[tensor].dims)


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray]) -> np.ndarray:
    """One unpacking node in int64 numpy (uint8 arithmetic wraps at 8 bits, as BitShift does)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Unsqueeze":
        return np.expand_dims(inputs[0], tuple(int(a) for a in inputs[1]))
    if node.op_type == "BitShift":
        shifted = inputs[0] << inputs[1] if attributes["direction"] == b"LEFT" else inputs[0] >> inputs[1]
        return shifted & 0xFF
    if node.op_type == "Reshape":
        return inputs[0].reshape(tuple(int(d) for d in inputs[1]))
    if node.op_type == "BitwiseOr":
        return inputs[0] | inputs[1]
    if node.op_type == "Slice":
        return inputs[0][int(inputs[1][0]):int(inputs[2][0])]
    if node.op_type == "Add":
        return inputs[0] + inputs[1]
    return inputs[0]  # Cast: the values fit every type on the way
