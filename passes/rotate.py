"""Incoherence processing: rotate the input space of every dense layer by a random-sign block
Hadamard transform ``Q = diag(s) blockdiag(H_b)`` (orthogonal), or with ``whole`` by one Hadamard
transform of the whole width ``Q = diag(s) (H_a kron H_b)``, without changing what the model
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
  ``MatMul(H_b)`` -> ``Reshape(Shape(x))`` (whole: ``Reshape [-1, a, b]`` -> ``MatMul(H_b)`` ->
  ``MatMul(H_a^T)``, a + b products per value), its matrices from ``Constant`` nodes at the head of
  the graph, one per matrix however many transforms read it (a dense-layer finder sees no
  constant-initializer weight to quantize there), the nodes tagged ``ONLINE_ROTATION`` in their
  doc string (``online_rotations`` lists them).

**The residual stream between RMS normalizations** (QuaRot; with ``residual``): where the layers reading an RMS
norm's output (``SimplifiedLayerNormalization``, onnxruntime's ``SkipSimplifiedLayerNormalization``,
``RMSNormalization``) are rotatable, the tensors those norms normalize form a stream: written by
``MatMul``/``Gemm`` layers (a decoder block's o and down projections), by residual ``Add``s and a
skip norm's sum output, and by anything else (the embedding ``Gather``); read only by those norms and
``Add``s. The whole stream turns by one ``Q``: its linear writers' output spaces are rotated (``P Q``),
another writer's output gets an online transform, and since ``rms(s Q) = rms(s)`` each norm then
outputs ``RMSNorm(s) Q`` once its gain ``g`` moves into the layers reading it (``Q^T diag(g) W``, the
gain set to ones). A decoder's q/k/v, gate/up and head projections then need no online transform
(per block two remain: before o and down). A stream with another reader (a graph output, a
LayerNorm, a ``Shape``) keeps the per-input rotations. Off by default: in weight-only quantization
the gain is better left in the activations, where it weights the rounding like a free per-channel
scale (SmolLM2 at 3 bits: the layers reading a norm round 21-28% worse with it folded).

With ``convs``, a ``Conv`` (``group`` 1, a constant weight ``[o, c, k..]`` read by it alone) is a
rotatable layer too: its input channels ``c`` (axis 1 of ``x`` ``[N, c, ..]``) are rotated, each
kernel tap's ``[o, c]`` slice taking ``Q`` (``conv(x Q, W Q) = conv(x, W)``, zero padding staying
zero), always by an online transform on the channel axis: ``Mul`` by signs ``[c, 1, ..]`` ->
``Reshape [0, a, b, -1]`` -> ``MatMul(H_b, .)`` (whole: ``Reshape [0, a, -1]`` -> ``MatMul(H_a^T, .)``)
-> ``Reshape(Shape(x))``, ``a = c / b``.

``b`` is the largest power of two dividing the input width, at most ``max_block``; a width with no
even factor is left alone. With ``whole``, ``b`` may be smaller so that ``a = width / b`` is the
order of a Hadamard matrix this module builds (Sylvester's times Paley's, at most ``4 max_block``);
a width with none keeps the block transform. Only the main graph is rotated.
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
    rows_are_inputs: bool  # weight stored [f, n] (MatMul, Gemm transB=0), else [n, f] (or a Conv's [o, c, k..])
    rank: int = 0  # a Conv's weight rank (its input's too: channels on axis 1); 0: MatMul/Gemm, the last axis


class RotateInputs:
    """``seed``: the signs' seed; ``max_block``: the largest Sylvester Hadamard block (a power of
    two); ``whole``: rotate each input's whole width where a Hadamard matrix of it is at hand;
    ``convs``: rotate the input channels of Conv layers too; ``residual``: turn a residual stream
    between RMS norms as one (module docstring); ``read``: how to read weights whose values may be
    in external data files."""

    def __init__(self, seed: int = 0, max_block: int = 64, read: TensorReader = read_in_proto,
                 whole: bool = False, convs: bool = False, residual: bool = False) -> None:
        if max_block < 2 or max_block & (max_block - 1):
            raise ValueError(f"max_block must be a power of two of at least 2, got {max_block}")
        self.seed, self.max_block, self.read, self.whole, self.convs = seed, max_block, read, whole, convs
        self.residual = residual

    def call(self, model: onnx.ModelProto) -> PassResult:
        groups = _groups(model.graph, self.convs)
        widths = {x: _width(model.graph, consumers[0]) for x, consumers in groups.items()}
        blocks = {x: _block(width, self.max_block) for x, width in widths.items()}
        groups = {key: consumers for key, consumers in groups.items() if blocks[key] >= 2}
        if not groups:
            return PassResult(model, modified=False)
        out = copy_model(model)
        graph = out.graph
        edit = _Edit(out, self.read)
        matrices = _Matrices(edit.used)
        inserted: list[tuple[int, list[onnx.NodeProto]]] = []
        streams = _streams(graph, groups) if self.residual else []  # their widths are their norms' readers'
        for j, stream in enumerate(streams):
            rotation = self._rotation(len(groups) + j, stream.width)
            inserted += _rotate_stream(out, stream, groups, rotation, edit, matrices)
            log.info("residual stream of %d norm(s) rotated (%s): %d writer(s) folded, %d online",
                     len(stream.norms), rotation, len(stream.folded), len(stream.online))
        handled = {(graph.node[norm].output[0], 0) for stream in streams for norm in stream.norms}
        for k, ((x, rank), consumers) in enumerate(groups.items()):
            if (x, rank) in handled:
                continue
            rotation = self._rotation(k, widths[x, rank])
            for consumer in consumers:
                edit.rotate_rows(consumer.weight, rotation, consumer.rows_are_inputs, consumer.rank)
            if not rank and _fold_into_producer(graph, x, consumers, rotation, edit):
                log.info("rotation of '%s' folded into its producer", x)
                continue
            nodes, rotated = _online(out, edit, matrices, x, rotation, rank)
            for consumer in consumers:
                graph.node[consumer.node].input[0] = rotated
            inserted.append((min(c.node for c in consumers), nodes))
            log.info("rotation of '%s' inserted before its %d layer(s), %s", x, len(consumers), rotation)
        edit.write()
        nodes = list(graph.node)
        for position, new in sorted(inserted, key=lambda item: -item[0]):
            nodes[position:position] = new
        nodes[0:0] = matrices.nodes
        del graph.node[:]
        graph.node.extend(nodes)
        return PassResult(out, modified=True)

    def _rotation(self, index: int, width: int) -> _Rotation:
        """The ``index``-th rotation of the pass (its signs seeded by the pass's seed and ``index``),
        over ``width`` inputs: blocks, or with ``whole`` the whole width where a Hadamard matrix is at hand."""
        signs = np.random.default_rng([self.seed, index]).choice([-1.0, 1.0], size=width)
        outer = _outer(width, self.max_block) if self.whole else None
        return _Rotation(signs, _block(width, self.max_block) if outer is None else width // len(outer), outer)


def online_rotations(model: onnx.ModelProto) -> set[str]:
    """Names of the main graph's nodes this pass inserted (tagged ``ONLINE_ROTATION``)."""
    return {node.name for node in model.graph.node if node.doc_string == ONLINE_ROTATION}


def hadamard(b: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order ``b`` (a power of two), symmetric."""
    return _sylvester(b) / np.sqrt(b)


def _sylvester(b: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_of_order(n: int) -> np.ndarray | None:
    """An orthonormal Hadamard matrix of order ``n``: Paley's (order q + 1 or 2(q + 1), q a prime)
    kron Sylvester's (a power of two), else None. Integer entries scaled once: the same bits on
    every machine."""
    twos = 1
    while n % twos == 0:
        core = _paley(n // twos)
        if core is not None:
            return np.kron(core, _sylvester(twos)) / np.sqrt(n)
        twos *= 2
    return None


def _paley(p: int) -> np.ndarray | None:
    """A +-1 Hadamard matrix of order ``p`` by Paley's constructions from a prime q (I: p = q + 1,
    q = 3 mod 4; II: p = 2(q + 1), q = 1 mod 4), or [[1]]; None when neither applies."""
    if p == 1:
        return np.ones((1, 1))
    for q, first in ((p - 1, True), (p // 2 - 1, False)):
        if q < 3 or (not first and p % 2) or q % 4 != (3 if first else 1) or not _prime(q):
            continue
        residues = {(i * i) % q for i in range(1, q)}
        chi = np.array([0] + [1 if d in residues else -1 for d in range(1, q)], dtype=np.float64)
        jacobsthal = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]  # chi(j - i)
        ones = np.ones((1, q))
        if first:  # I + S, S = [[0, 1], [-1, Q]] skew-symmetric
            return np.eye(p) + np.block([[np.zeros((1, 1)), ones], [-ones.T, jacobsthal]])
        conference = np.block([[np.zeros((1, 1)), ones], [ones.T, jacobsthal]])  # symmetric
        return (np.kron(conference, np.array([[1.0, 1.0], [1.0, -1.0]]))
                + np.kron(np.eye(q + 1), np.array([[1.0, -1.0], [-1.0, -1.0]])))
    return None


def _prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


@dataclass(frozen=True)
class _Rotation:
    """``Q = diag(signs) (outer kron H_b)`` (``outer`` None: the identity, a block transform);
    applied along an axis in float64."""

    signs: np.ndarray
    block: int
    outer: np.ndarray | None = None

    def right(self, values: np.ndarray) -> np.ndarray:
        """``values @ Q`` over the last axis."""
        signed = values.astype(np.float64) * self.signs
        blocks = signed.reshape(*signed.shape[:-1], -1, self.block) @ hadamard(self.block)
        if self.outer is not None:  # (X (A kron B)) = A^T X B, X the row viewed as [a, b]
            blocks = np.matmul(self.outer.T, blocks)
        return blocks.reshape(signed.shape)

    def __str__(self) -> str:
        if self.outer is None:
            return f"blocks of {self.block}"
        return f"the whole width ({len(self.outer)} x {self.block} Hadamard)"

    def transposed_left(self, values: np.ndarray) -> np.ndarray:
        """``Q^T @ values`` over the first axis."""
        return self.right(values.T).T


def _groups(graph: onnx.GraphProto, convs: bool) -> dict[tuple[str, int], list[_Consumer]]:
    """The rotatable layers of the main graph by input tensor and axis (a Conv's weight rank, 0 for
    the last axis), in graph order."""
    initializers = {init.name: init for init in graph.initializer}
    uses = _uses(graph)
    inputs = {v.name for v in graph.input} | {v.name for v in graph.output}
    kinds = ("MatMul", "Gemm", "Conv") if convs else ("MatMul", "Gemm")
    groups: dict[tuple[str, int], list[_Consumer]] = {}
    for i, node in enumerate(graph.node):
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in kinds or len(node.input) < 2:
            continue
        x, weight = node.input[0], node.input[1]
        init = initializers.get(weight)
        if (init is None or x in initializers or weight in inputs or uses.get(weight) != 1
                or init.data_type != onnx.TensorProto.FLOAT):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            if len(init.dims) >= 3 and attrs.get("group", 1) == 1:
                groups.setdefault((x, len(init.dims)), []).append(_Consumer(i, weight, False, len(init.dims)))
        elif len(init.dims) == 2 and not attrs.get("transA", 0):
            groups.setdefault((x, 0), []).append(_Consumer(i, weight, not attrs.get("transB", 0)))
    return groups


def _width(graph: onnx.GraphProto, consumer: _Consumer) -> int:
    dims = next(init.dims for init in graph.initializer if init.name == consumer.weight)
    return int(dims[0] if consumer.rows_are_inputs else dims[1])


def _outer(width: int, max_block: int) -> np.ndarray | None:
    """``H_a`` of the whole-width transform ``H_a kron H_b`` (``b`` a power of two, at most
    ``max_block``, the largest such with a Hadamard matrix of order ``a`` at most ``4 max_block``),
    or None: a block transform."""
    block = _block(width, max_block)
    if block == width:  # the block transform is already the whole width
        return None
    while block >= 2:
        outer = width // block
        if outer <= 4 * max_block:
            h = hadamard_of_order(outer)
            if h is not None:
                return h
        block //= 2
    return None


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

    def rotate_rows(self, name: str, rotation: _Rotation, rows_are_inputs: bool, rank: int = 0,
                    gain: np.ndarray | None = None) -> None:
        """A weight's input axis rotated: ``Q^T W`` ([f, n]) or ``W Q`` ([n, f]; a Conv's [o, c, k..] over c);
        with ``gain`` (a norm's, moved into a MatMul/Gemm) scaled by it first, ``Q^T diag(g) W``, in float64."""
        w = self.value(name)
        scaled = w if gain is None else w.astype(np.float64) * (gain.astype(np.float64)[:, None] if rows_are_inputs
                                                               else gain)
        if rank:
            turned = np.moveaxis(rotation.right(np.moveaxis(scaled, 1, -1)), -1, 1)
        else:
            turned = rotation.transposed_left(scaled) if rows_are_inputs else rotation.right(scaled)
        self.values[name] = turned.astype(w.dtype, order="C")  # one copy, in the weight's type

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


# (op_type, domain) -> (the stream inputs it normalizes, its gain's input, its sum output or -1)
RMS_NORMS = {("SimplifiedLayerNormalization", ""): ((0,), 1, -1),
             ("SimplifiedLayerNormalization", "com.microsoft"): ((0,), 1, -1),
             ("RMSNormalization", ""): ((0,), 1, -1),
             ("SkipSimplifiedLayerNormalization", "com.microsoft"): ((0, 1), 2, 3)}


@dataclass
class _Stream:
    """A residual stream (module docstring): its width, the norms reading it (node indices), its
    linear writers whose output space turns (node indices), the tensors other writers give it
    (turned online), and the constant biases added into it (a skip norm's)."""

    width: int
    norms: list[int]
    folded: list[int]
    online: list[str]
    biases: list[str]


def _rms_norm(node: onnx.NodeProto) -> tuple[tuple[int, ...], int, int] | None:
    """How ``node`` reads a stream, if it is an RMS norm over its input's last axis."""
    spec = RMS_NORMS.get((node.op_type, node.domain if node.domain != "ai.onnx" else ""))
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
    return spec if spec is not None and axis == -1 else None


def _streams(graph: onnx.GraphProto, groups: dict[tuple[str, int], list[_Consumer]]) -> list[_Stream]:
    """The residual streams whose every norm output is read by rotatable layers alone, and every
    tensor only by norms and residual Adds (module docstring)."""
    walk = _StreamWalk(graph)
    found, claimed = [], set()
    for start, node in enumerate(graph.node):
        if start not in claimed and _rms_norm(node) is not None:
            stream, norms = walk.component(start, groups)
            claimed |= norms
            if stream is not None:
                found.append(stream)
    return found


class _StreamWalk:
    """The graph's producers, readers and constants, to walk a stream from one of its norms."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
        self.readers: dict[str, list[int]] = {}
        for i, node in enumerate(graph.node):
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(i)
        self.blocked = {v.name for v in graph.output} | {n for node in graph.node for _, g in subgraphs(node)
                                                          for n in outer_reads(g)}
        self.uses = _uses(graph)

    def residual_add(self, i: int) -> bool:
        node = self.graph.node[i]
        return (node.op_type == "Add" and node.domain in DEFAULT_DOMAINS and len(node.input) == 2
                and not any(name in self.initializers for name in node.input))

    def constant(self, name: str) -> bool:
        """A float initializer read by one node only (so its values may change)."""
        init = self.initializers.get(name)
        return init is not None and self.uses.get(name) == 1 and init.data_type == onnx.TensorProto.FLOAT

    def linear_writer(self, i: int, width: int) -> bool:
        """A MatMul/Gemm writing ``width`` outputs through a constant weight (and bias) of its own."""
        node = self.graph.node[i]
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in DEFAULT_DOMAINS or len(node.input) < 2:
            return False
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        weight = node.input[1]
        return (self.constant(weight) and len(self.initializers[weight].dims) == 2
                and self.initializers[weight].dims[0 if attrs.get("transB", 0) else 1] == width
                and node.input[0] not in self.initializers and not attrs.get("transA", 0)
                and (bias is None or self.constant(bias)))

    def component(self, start: int, groups: dict[tuple[str, int], list[_Consumer]]) -> tuple[_Stream | None, set[int]]:
        """The stream norm ``start`` reads (None where it cannot turn as one), and every norm reached."""
        graph, readers = self.graph, self.readers
        norms: set[int] = set()
        pending: list[str] = []

        def add_norm(i: int) -> None:
            """A norm reading the stream: its other stream inputs and its sum output are the stream too."""
            spec = _rms_norm(graph.node[i])
            assert spec is not None
            norms.add(i)
            outputs = graph.node[i].output
            pending.extend(graph.node[i].input[k] for k in spec[0])
            if spec[2] >= 0 and len(outputs) > spec[2] and outputs[spec[2]]:
                pending.append(outputs[spec[2]])

        add_norm(start)
        written: set[int] = set()  # nodes writing into the stream that are not norms or Adds
        online: set[str] = set()
        seen: set[str] = set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in self.blocked or name in self.initializers:
                return None, norms
            producer = self.producers.get(name, -1)
            spec = _rms_norm(graph.node[producer]) if producer >= 0 else None
            if spec is not None and spec[2] >= 0 and graph.node[producer].output[spec[2]] == name:
                add_norm(producer)  # a skip norm's sum
            elif producer >= 0 and self.residual_add(producer):
                pending += list(graph.node[producer].input)
            elif producer >= 0 and graph.node[producer].op_type in ("MatMul", "Gemm"):
                written.add(producer)
            else:
                online.add(name)
            for reader in readers.get(name, []):
                spec = _rms_norm(graph.node[reader])
                if spec is not None and any(graph.node[reader].input[k] == name for k in spec[0]) \
                        and graph.node[reader].input[spec[1]] != name:
                    add_norm(reader)
                elif self.residual_add(reader):
                    pending.append(graph.node[reader].output[0])
                else:
                    return None, norms  # a reader that needs the stream as it is
        width, biases = 0, set()
        for i in sorted(norms):
            norm = graph.node[i]
            spec = _rms_norm(norm)
            assert spec is not None
            y, gain = norm.output[0], self.initializers.get(norm.input[spec[1]])
            consumers = groups.get((y, 0), [])
            sum_output = norm.output[spec[2]] if 0 <= spec[2] < len(norm.output) else ""
            if (gain is None or len(gain.dims) != 1 or gain.data_type != onnx.TensorProto.FLOAT or not consumers
                    or sorted(readers.get(y, [])) != sorted(c.node for c in consumers) or y in self.blocked
                    or width not in (0, gain.dims[0])
                    or any(readers.get(extra) for extra in norm.output[1:] if extra and extra != sum_output)):
                return None, norms
            width = int(gain.dims[0])
            if spec[2] >= 0 and len(norm.input) > 3 and norm.input[3]:  # a skip norm's bias, added into the sum
                if not self.constant(norm.input[3]):
                    return None, norms
                biases.add(norm.input[3])
        folded = {i for i in written if self.linear_writer(i, width)}
        online |= {graph.node[i].output[0] for i in written - folded}
        return _Stream(width, sorted(norms), sorted(folded), sorted(online), sorted(biases)), norms


def _rotate_stream(model: onnx.ModelProto, stream: _Stream, groups: dict[tuple[str, int], list[_Consumer]],
                   rotation: _Rotation, edit: _Edit, matrices: _Matrices) -> list[tuple[int, list[onnx.NodeProto]]]:
    """Turn ``stream`` by ``rotation``: its linear writers' output spaces and biases, an online
    transform after each other writer, each norm's gain moved into the layers reading it (then turned
    like any rotated layer's input) and set to ones. Returns the online transforms and where they go."""
    graph = model.graph
    for i in stream.folded:
        node = graph.node[i]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        edit.rotate_columns(node.input[1], rotation, columns_are_outputs=not trans_b)
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            edit.broadcast_last(node.input[2], stream.width)
            edit.rotate_columns(node.input[2], rotation, columns_are_outputs=True)
    for bias in stream.biases:
        edit.broadcast_last(bias, stream.width)
        edit.rotate_columns(bias, rotation, columns_are_outputs=True)
    ones = fresh_name(edit.used, "RotateInputs/unit_gain")
    graph.initializer.append(numpy_helper.from_array(np.ones(stream.width, np.float32), ones))
    for i in stream.norms:
        norm = graph.node[i]
        spec = _rms_norm(norm)
        assert spec is not None
        gain = edit.value(norm.input[spec[1]])
        for consumer in groups[norm.output[0], 0]:
            edit.rotate_rows(consumer.weight, rotation, consumer.rows_are_inputs, gain=gain)
        norm.input[spec[1]] = ones
    inserted = []
    for name in stream.online:
        readers = [i for i, node in enumerate(graph.node) if name in node.input]
        nodes, rotated = _online(model, edit, matrices, name, rotation)
        for i in readers:
            node = graph.node[i]
            node.input[:] = [rotated if x == name else x for x in node.input]
        inserted.append((min(readers), nodes))
    return inserted


def _uses(graph: onnx.GraphProto) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in list(node.input) + [n for _, g in subgraphs(node) for n in outer_reads(g)]:
            uses[name] = uses.get(name, 0) + 1
    return uses


class _Matrices:
    """The transforms' Hadamard matrices, one ``Constant`` node per matrix however many transforms
    read it, all at the head of the graph (Constants: a dense-layer finder sees no
    constant-initializer weight to quantize there)."""

    def __init__(self, used: set[str]) -> None:
        self.used = used
        self.names: dict[str, str] = {}
        self.nodes: list[onnx.NodeProto] = []

    def __call__(self, label: str, matrix: np.ndarray) -> str:
        if label not in self.names:
            name = fresh_name(self.used, f"RotateInputs/{label}")
            value = numpy_helper.from_array(np.ascontiguousarray(matrix).astype(np.float32), name)
            node = helper.make_node("Constant", [], [name], value=value, name=fresh_name(self.used, f"{name}/Constant"),
                                    doc_string=ONLINE_ROTATION)
            self.names[label] = name
            self.nodes.append(node)
        return self.names[label]


def _online(model: onnx.ModelProto, edit: _Edit, matrices: _Matrices, x: str, rotation: _Rotation,
            rank: int = 0) -> tuple[list[onnx.NodeProto], str]:
    """The nodes computing ``x Q`` over the last axis (``rank`` 0) or over the channel axis of an
    input of that rank, and the name of their output."""
    used, b = edit.used, rotation.block
    a = len(rotation.signs) // b if rotation.outer is None else len(rotation.outer)
    base = x.replace("/", "_").strip("_") + "_rotated"
    parts = ["signs", "signed", "rows_shape", "rows", "mixed", "shape", "out"]
    if rotation.outer is not None:
        parts += ["outer_mixed"] + (["columns_shape", "columns"] if rank else [])
    names = {part: fresh_name(used, f"{base}/{part}") for part in parts}
    if rank:  # channels on axis 1: [N, a, b, rest], H_b from the left over b (Sylvester's is symmetric)
        signs, rows_shape = rotation.signs.reshape(-1, *[1] * (rank - 2)), [0, a, b, -1]
    else:
        signs, rows_shape = rotation.signs, [-1, b] if rotation.outer is None else [-1, a, b]
    model.graph.initializer.extend([
        numpy_helper.from_array(signs.astype(np.float32), names["signs"]),
        numpy_helper.from_array(np.array(rows_shape, np.int64), names["rows_shape"])])
    h = matrices(f"hadamard_{b}", hadamard(b))
    nodes = [
        helper.make_node("Mul", [x, names["signs"]], [names["signed"]]),
        helper.make_node("Reshape", [names["signed"], names["rows_shape"]], [names["rows"]]),
        helper.make_node("MatMul", [h, names["rows"]] if rank else [names["rows"], h], [names["mixed"]]),
    ]
    mixed = names["mixed"]
    if rotation.outer is not None:  # H_a^T from the left, over the a axis (channels: [N, a, b * rest])
        outer = matrices(f"hadamard_{a}_transposed", rotation.outer.T)
        if rank:
            model.graph.initializer.append(numpy_helper.from_array(np.array([0, a, -1], np.int64),
                                                                   names["columns_shape"]))
            nodes.append(helper.make_node("Reshape", [mixed, names["columns_shape"]], [names["columns"]]))
            mixed = names["columns"]
        nodes.append(helper.make_node("MatMul", [outer, mixed], [names["outer_mixed"]]))
        mixed = names["outer_mixed"]
    nodes += [helper.make_node("Shape", [x], [names["shape"]]),
              helper.make_node("Reshape", [mixed, names["shape"]], [names["out"]])]
    for node in nodes:
        node.name = fresh_name(used, f"{base}/{node.op_type}")
        node.doc_string = ONLINE_ROTATION
    return nodes, names["out"]
