"""Incoherence processing: rotate the input space of every dense layer by a random-sign block
Hadamard transform ``Q = diag(s) blockdiag(H_b)`` (orthogonal), without changing what the model
computes: ``x W = (x Q)(Q^T W)``.

A quantizer run on the rotated model then sees the rotated weight ``Q^T W`` and the rotated inputs
``x Q``, in which no input direction or weight stands out (QuIP, QuaRot), and needs no change.

Per input tensor ``x`` read by rotatable layers (``MatMul(x, W)`` with a constant 2-D ``W``,
``Gemm(x, B)`` with ``transA=0`` and a constant ``B``; each weight read by that node alone), one
``Q`` (signs seeded by the pass's seed and the tensor's order) and:

- **folded into the producer** when ``x`` is read by those layers alone and produced by a
  ``MatMul``/``Gemm`` with a constant weight (and bias), or by an ``Add`` of a constant to such a
  ``MatMul``'s output: the producer's output space is rotated (``P Q``, bias ``c Q``);
- otherwise **an online transform** before the layers, ``Mul(x, s)`` -> ``Reshape [-1, b]`` ->
  ``MatMul(H_b)`` -> ``Reshape(Shape(x))``, its ``H_b`` from a ``Constant`` node (a dense-layer
  finder sees no constant-initializer weight to quantize there) and the node tagged
  ``ONLINE_ROTATION`` in its doc string (``online_rotations`` lists them).

``b`` is the largest power of two dividing the input width, at most ``max_block``; a width with no
even factor is left alone. Only the main graph is rotated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .base import PassResult, copy_model
from .graphs import TensorReader, fresh_name, names_used, outer_reads, read_in_proto, subgraphs

log = logging.getLogger(__name__)

ONLINE_ROTATION = "RotateInputs: online Hadamard rotation"
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class _Consumer:
    node: int  # index in the main graph
    weight: str
    rows_are_inputs: bool  # weight stored [f, n] (MatMul, Gemm transB=0), else [n, f]


class RotateInputs:
    """``seed``: the signs' seed; ``max_block``: the largest Hadamard block (a power of two);
    ``read``: how to read weights whose values may be in external data files."""

    def __init__(self, seed: int = 0, max_block: int = 64, read: TensorReader = read_in_proto) -> None:
        if max_block < 2 or max_block & (max_block - 1):
            raise ValueError(f"max_block must be a power of two of at least 2, got {max_block}")
        self.seed, self.max_block, self.read = seed, max_block, read

    def call(self, model: onnx.ModelProto) -> PassResult:
        groups = _groups(model.graph)
        widths = {x: _width(model.graph, consumers[0]) for x, consumers in groups.items()}
        blocks = {x: _block(width, self.max_block) for x, width in widths.items()}
        groups = {x: consumers for x, consumers in groups.items() if blocks[x] >= 2}
        if not groups:
            return PassResult(model, modified=False)
        out = copy_model(model)
        graph = out.graph
        edit = _Edit(out, self.read)
        inserted: list[tuple[int, list[onnx.NodeProto]]] = []
        for k, (x, consumers) in enumerate(groups.items()):
            signs = np.random.default_rng([self.seed, k]).choice([-1.0, 1.0], size=widths[x])
            rotation = _Rotation(signs, blocks[x])
            for consumer in consumers:
                edit.rotate_rows(consumer.weight, rotation, consumer.rows_are_inputs)
            if _fold_into_producer(graph, x, consumers, rotation, edit):
                log.info("rotation of '%s' folded into its producer", x)
                continue
            nodes, rotated = _online(out, edit, x, rotation)
            for consumer in consumers:
                graph.node[consumer.node].input[0] = rotated
            inserted.append((min(c.node for c in consumers), nodes))
            log.info("rotation of '%s' inserted before its %d layer(s), blocks of %d", x, len(consumers), blocks[x])
        edit.write()
        nodes = list(graph.node)
        for position, new in sorted(inserted, key=lambda item: -item[0]):
            nodes[position:position] = new
        del graph.node[:]
        graph.node.extend(nodes)
        return PassResult(out, modified=True)


def online_rotations(model: onnx.ModelProto) -> set[str]:
    """Names of the main graph's nodes this pass inserted (tagged ``ONLINE_ROTATION``)."""
    return {node.name for node in model.graph.node if node.doc_string == ONLINE_ROTATION}


def hadamard(b: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order ``b`` (a power of two), symmetric."""
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(b)


@dataclass(frozen=True)
class _Rotation:
    """``Q = diag(signs) blockdiag(H_b)``; applied along an axis in float64."""

    signs: np.ndarray
    block: int

    def right(self, values: np.ndarray) -> np.ndarray:
        """``values @ Q`` over the last axis."""
        signed = values.astype(np.float64) * self.signs
        blocks = signed.reshape(*signed.shape[:-1], -1, self.block) @ hadamard(self.block)
        return blocks.reshape(signed.shape)

    def transposed_left(self, values: np.ndarray) -> np.ndarray:
        """``Q^T @ values`` over the first axis."""
        return self.right(values.T).T


def _groups(graph: onnx.GraphProto) -> dict[str, list[_Consumer]]:
    """The rotatable layers of the main graph by input tensor, in graph order."""
    initializers = {init.name: init for init in graph.initializer}
    uses = _uses(graph)
    inputs = {v.name for v in graph.input} | {v.name for v in graph.output}
    groups: dict[str, list[_Consumer]] = {}
    for i, node in enumerate(graph.node):
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        x, weight = node.input[0], node.input[1]
        init = initializers.get(weight)
        if (init is None or x in initializers or weight in inputs or uses.get(weight) != 1
                or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            continue
        groups.setdefault(x, []).append(_Consumer(i, weight, not attrs.get("transB", 0)))
    return groups


def _width(graph: onnx.GraphProto, consumer: _Consumer) -> int:
    dims = next(init.dims for init in graph.initializer if init.name == consumer.weight)
    return int(dims[0] if consumer.rows_are_inputs else dims[1])


def _block(width: int, max_block: int) -> int:
    """The largest power of two dividing ``width``, at most ``max_block`` (1: none)."""
    block = 1
    while block < max_block and width % (2 * block) == 0:
        block *= 2
    return block


class _Edit:
    """The initializers being rotated: values read once, transformed (in float64, kept in their own
    type), written at the end."""

    def __init__(self, model: onnx.ModelProto, read: TensorReader) -> None:
        self.model, self.read = model, read
        self.values: dict[str, np.ndarray] = {}
        self.used = names_used(model.graph)

    def value(self, name: str) -> np.ndarray:
        if name not in self.values:
            init = next(i for i in self.model.graph.initializer if i.name == name)
            self.values[name] = self.read(init, self.model)
        return self.values[name]

    def rotate_rows(self, name: str, rotation: _Rotation, rows_are_inputs: bool) -> None:
        """A weight's input axis rotated: ``Q^T W`` ([f, n]) or ``W Q`` ([n, f])."""
        w = self.value(name)
        self.values[name] = (rotation.transposed_left(w) if rows_are_inputs else rotation.right(w)).astype(w.dtype)

    def rotate_columns(self, name: str, rotation: _Rotation, columns_are_outputs: bool) -> None:
        """A producer's output axis rotated: ``P Q`` ([.., f]) or ``Q^T P`` ([f, ..])."""
        w = self.value(name)
        self.values[name] = (rotation.right(w) if columns_are_outputs else rotation.transposed_left(w)).astype(w.dtype)

    def broadcast_last(self, name: str, width: int) -> None:
        """A bias broadcast to ``width`` on its last axis (then rotatable there)."""
        c = self.value(name)
        c = c.reshape(1) if c.ndim == 0 else c
        self.values[name] = np.broadcast_to(c, (*c.shape[:-1], width)).copy()

    def write(self) -> None:
        """Each value into its initializer, dropped once written (one copy of the weights at a time)."""
        graph = self.model.graph
        for i, init in enumerate(graph.initializer):
            if init.name in self.values:
                graph.initializer[i].CopyFrom(numpy_helper.from_array(self.values.pop(init.name), init.name))


def _fold_into_producer(graph: onnx.GraphProto, x: str, consumers: list[_Consumer], rotation: _Rotation,
                        edit: _Edit) -> bool:
    """Rotate the output space of ``x``'s producer instead of ``x`` when the algebra allows."""
    readers = [i for i, node in enumerate(graph.node) if x in node.input]
    in_bodies = any(x in outer_reads(g) for node in graph.node for _, g in subgraphs(node))
    if (sorted(readers) != sorted(c.node for c in consumers) or in_bodies
            or x in {v.name for v in graph.output}):
        return False
    producers = {out: node for node in graph.node for out in node.output}
    uses = _uses(graph)
    initializers = {init.name: init for init in graph.initializer}

    def constant(name: str) -> bool:
        init = initializers.get(name)
        return init is not None and uses.get(name) == 1 and init.data_type == onnx.TensorProto.FLOAT

    producer = producers.get(x)
    bias = None
    if producer is not None and producer.op_type == "Add" and producer.domain in DEFAULT_DOMAINS:
        bias = next((n for n in producer.input if constant(n)), None)
        other = [n for n in producer.input if n != bias]
        if bias is None or len(other) != 1 or uses.get(other[0]) != 1:
            return False
        producer = producers.get(other[0])
        if producer is None or producer.op_type != "MatMul":
            return False
    if producer is None or producer.domain not in DEFAULT_DOMAINS or producer.op_type not in ("MatMul", "Gemm"):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in producer.attribute}
    weight = producer.input[1]
    if not constant(weight) or len(initializers[weight].dims) != 2 or producer.input[0] in initializers:
        return False
    if producer.op_type == "Gemm" and len(producer.input) > 2 and producer.input[2]:
        if bias is not None or not constant(producer.input[2]):
            return False
        bias = producer.input[2]
    width = len(rotation.signs)
    if bias is not None and (initializers[bias].dims or [1])[-1] not in (1, width):
        return False
    edit.rotate_columns(weight, rotation, columns_are_outputs=not attrs.get("transB", 0))
    if bias is not None:
        edit.broadcast_last(bias, width)
        edit.rotate_columns(bias, rotation, columns_are_outputs=True)
    return True


def _uses(graph: onnx.GraphProto) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in list(node.input) + [n for _, g in subgraphs(node) for n in outer_reads(g)]:
            uses[name] = uses.get(name, 0) + 1
    return uses


def _online(model: onnx.ModelProto, edit: _Edit, x: str, rotation: _Rotation) -> tuple[list[onnx.NodeProto], str]:
    """The nodes computing ``x Q`` and the name of their output."""
    used, b = edit.used, rotation.block
    base = x.replace("/", "_").strip("_") + "_rotated"
    names = {part: fresh_name(used, f"{base}/{part}") for part in
             ("signs", "signed", "rows_shape", "rows", "hadamard", "mixed", "shape", "out")}
    model.graph.initializer.extend([
        numpy_helper.from_array(rotation.signs.astype(np.float32), names["signs"]),
        numpy_helper.from_array(np.array([-1, b], np.int64), names["rows_shape"])])
    h = numpy_helper.from_array(hadamard(b).astype(np.float32), names["hadamard"])
    nodes = [
        helper.make_node("Mul", [x, names["signs"]], [names["signed"]]),
        helper.make_node("Reshape", [names["signed"], names["rows_shape"]], [names["rows"]]),
        helper.make_node("Constant", [], [names["hadamard"]], value=h),
        helper.make_node("MatMul", [names["rows"], names["hadamard"]], [names["mixed"]]),
        helper.make_node("Shape", [x], [names["shape"]]),
        helper.make_node("Reshape", [names["mixed"], names["shape"]], [names["out"]]),
    ]
    for node in nodes:
        node.name = fresh_name(used, f"{base}/{node.op_type}")
        node.doc_string = ONLINE_ROTATION
    return nodes, names["out"]
