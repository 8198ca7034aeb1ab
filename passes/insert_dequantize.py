"""Replace float dense weights by integer initializers feeding DequantizeLinear.

The pass owns what every layer shares: finding the one node that reads each weight, fresh
names, integer initializers and their ``DequantizeLinear`` (``GraphEdit``), the optional
bias-correction ``Add`` after the layer, and dropping the float initializers. A layer inside an
If/Loop/Scan body is rewritten where it lives, its DequantizeLinear beside it in the body (a
branch that does not run dequantizes nothing, and onnxruntime's fusions, which stay within one
graph, see DequantizeLinear -> Gemm together), its integer initializers in the main graph, read
from the body as its float weight was. How one node is
rewritten around its dequantized weight belongs to the node's form (onnx_qubo/forms/: Gemm,
MatMul...), handed in with each weight as a ``DenseLowering``; a runtime kernel written
instead of DequantizeLinear (onnxruntime's MatMulNBits...) as a ``KernelLayer``.

Integers are stored packed (ml_dtypes int2/int4 through ``numpy_helper.from_array``), with a
scale per tensor (scalar), per output row (``axis=0``) or per block of inputs within a row
(``axis=1``, ``block_size``), and a zero-point input only when one is given; codes narrower than
their type (3 bits in INT4) packed at their own width where asked (packed_codes.py), the nodes
unpacking them first in the main graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .base import PassResult, copy_model
from .graphs import TensorReader, all_graphs, fresh_name, names_used, read_in_proto
from .packed_codes import unpack_nodes


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Integers as DequantizeLinear reads them: ``(integers - zero_point) * scale``."""

    integers: np.ndarray
    scale: np.ndarray  # () per tensor, [n] along axis 0, or [n, g] blocks along axis 1
    zero_point: np.ndarray | None  # integers, the shape of scale; None: 0 (no zero-point input)
    storage_type: int  # onnx.TensorProto.INT2 / UINT4 / INT32 ...
    block_size: int = 0  # with a 2-D scale: inputs per block
    offset: np.ndarray | None = None  # float zero points as scale * zero_point, the shape of scale (subtract_offsets)
    packed_bits: int = 0  # the codes' width where they are packed at it (packed_codes.py); 0: stored as storage_type

    def attributes(self) -> dict[str, Any]:
        if self.scale.ndim == 0:
            return {}
        if self.scale.ndim == 1:
            return {"axis": 0}
        return {"axis": 1, "block_size": self.block_size}


def float_dtype(tensor: QuantizedTensor) -> type[np.floating]:
    """The float type ``tensor`` dequantizes to, its scale's: float16 for a half-precision layer,
    else float32."""
    return np.float16 if np.asarray(tensor.scale).dtype == np.float16 else np.float32


def dequantized(tensor: QuantizedTensor) -> np.ndarray:
    """What DequantizeLinear computes from ``tensor`` (a scale per tensor, per row along axis 0,
    or per block of ``block_size`` along axis 1), in its ``float_dtype`` (products in float32,
    exact for integers of up to 8 bits times a float16 scale, then rounded)."""
    integers = np.asarray(tensor.integers)

    def per_value(values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if values.ndim == 1 and integers.ndim > 1:
            return values.reshape(-1, *[1] * (integers.ndim - 1))
        if values.ndim == 2:
            return np.repeat(values, tensor.block_size, axis=1)[:, :integers.shape[1]]
        return values

    zero = 0 if tensor.zero_point is None else per_value(tensor.zero_point)
    scale = per_value(np.asarray(tensor.scale, np.float32))
    return ((integers - zero).astype(np.float32) * scale).astype(float_dtype(tensor))


@dataclass(frozen=True)
class ActivationQuantization:
    """Per-tensor 8-bit quantization of a layer's activation input."""

    scale: float
    zero_point: int
    storage_type: int  # INT8 or UINT8


@dataclass(frozen=True)
class Lowered:
    """The nodes that replace a layer's node, tensors other readers must now read instead (e.g.
    the bias operand of the Add after a MatMul, replaced by its dequantized form), the opset
    each non-default domain the nodes use needs, initializers it replaced besides the weight
    (a recurrent node's R), and whether it applied the weight's ``output_shift`` itself (a
    recurrent node's bias correction goes into its B, not after its output)."""

    nodes: list[onnx.NodeProto]
    renames: dict[str, str] = field(default_factory=dict)
    opsets: dict[str, int] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    shift_folded: bool = False


class KernelNodes(Protocol):
    """A kernel's nodes reading the activation and writing the output, their initializers, and
    the least opset version each domain they use needs."""

    @property
    def nodes(self) -> list[onnx.NodeProto]: ...

    @property
    def initializers(self) -> list[onnx.TensorProto]: ...

    @property
    def opsets(self) -> dict[str, int]: ...


class KernelLayer(Protocol):
    """A layer written as a runtime's own kernel instead of DequantizeLinear (onnx_qubo:
    backends/kernels.py's FastLayer). ``build`` returns the kernel's nodes, or why the layer cannot use it."""

    def build(self, activation: str, output: str, fresh: Callable[[str], str]) -> KernelNodes | str: ...


class DenseLowering(Protocol):
    """How a form rewrites its node around the weight's integers (onnx_qubo: forms/)."""

    op_type: str

    def lower(self, node: onnx.NodeProto, weight: "QuantizedWeight", edit: "GraphEdit") -> Lowered: ...


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Integer weights [n_out, f_in] for the single node that reads initializer ``name``."""

    name: str
    weight: QuantizedTensor
    form: DenseLowering
    activation_rank: int | None  # rank of the node's activation input, None when unknown
    output_shift: np.ndarray | None = None  # [n_out] added to the node's output (bias correction)
    bias_name: str | None = None  # the bias initializer that ``bias`` replaces
    bias: QuantizedTensor | None = None  # [n_out]
    activation: ActivationQuantization | None = None
    fast: KernelLayer | None = None  # a runtime kernel to write instead of DequantizeLinear
    float_bias: np.ndarray | None = None  # [n_out], the weight's float type: replaces ``bias_name``


class InsertDequantize:
    """Each weight's node replaced by its form's lowering; float weights and replaced biases
    dropped. ``read``: how forms read an initializer whose values may be in external data files."""

    def __init__(self, weights: list[QuantizedWeight], read: TensorReader = read_in_proto):
        self.weights = weights
        self.read = read

    def call(self, model: onnx.ModelProto) -> PassResult:
        if not self.weights:
            return PassResult(model, modified=False)
        out = copy_model(model)
        graph = out.graph
        graphs = all_graphs(graph)  # a layer inside an If/Loop/Scan body is rewritten in its body
        # integer initializers in the main graph, read from the body
        edit = GraphEdit(graph, lambda tensor: self.read(tensor, out))
        replacements: dict[tuple[int, int], list[onnx.NodeProto]] = {}
        renames: dict[str, str] = {}
        dropped = {w.name for w in self.weights} | {w.bias_name for w in self.weights if w.bias_name}
        for weight in self.weights:
            where = _only_reader(graphs, weight)
            lowered = weight.form.lower(graphs[where[0]].node[where[1]], weight, edit)
            nodes = lowered.nodes
            renames.update(lowered.renames)
            dropped |= lowered.dropped
            _import_opsets(out, lowered.opsets)
            if weight.output_shift is not None and not lowered.shift_folded:
                shift = edit.constant(f"{nodes[-1].output[0]}_shift",
                                      weight.output_shift.astype(float_dtype(weight.weight)))
                nodes += edit.add_to_output(nodes, shift, "bias_correction")
            replacements[where] = nodes

        for g, body in reversed(list(enumerate(graphs))):  # bodies before the nodes holding them are copied
            nodes = []
            for i, node in enumerate(body.node):
                nodes.extend(replacements.get((g, i), [node]))
            for node in nodes:
                for k, name in enumerate(node.input):
                    if name in renames:
                        node.input[k] = renames[name]
            del body.node[:]
            body.node.extend(nodes)
            _remove(body.value_info, dropped)
        for container in (graph.initializer, graph.input):
            _remove(container, dropped)
        if edit.unpacking:  # on initializers only: first in the main graph, wherever their codes are read
            main = edit.unpacking + list(graph.node)
            del graph.node[:]
            graph.node.extend(main)
        return PassResult(out, modified=True)


class GraphEdit:
    """Adds initializers and nodes to a graph under names that clash with none already there."""

    def __init__(self, graph: onnx.GraphProto,
                 read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array):
        self.graph = graph
        self.read = read  # an initializer's values (InsertDequantize's reader where they may be external)
        self.used = names_used(graph)  # subgraphs too: a body may not shadow an outer name
        self.unpacking: list[onnx.NodeProto] = []  # packed codes' unpacking nodes, for the main graph's start
        self.shared: dict[tuple[str, bytes], str] = {}  # shared_constant's initializers by type and value

    def fresh(self, base: str) -> str:
        return fresh_name(self.used, base)

    def fast(self, weight: QuantizedWeight, activation: str, output: str) -> Lowered:
        """``weight.fast``'s kernel nodes reading ``activation`` and writing ``output``."""
        assert weight.fast is not None
        form = weight.fast.build(activation, output, self.fresh)
        if isinstance(form, str):  # whoever chose the kernel already accepted this layer
            raise ValueError(f"layer weight '{weight.name}': {form}")
        self.graph.initializer.extend(form.initializers)
        return Lowered(form.nodes, opsets={d: v for d, v in form.opsets.items() if d not in ("", "ai.onnx")})

    def constant(self, base: str, value: np.ndarray) -> str:
        """A new initializer holding ``value``; returns its name."""
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def shared_constant(self, base: str, value: np.ndarray) -> str:
        """An initializer holding ``value``, added once for every caller asking for the same value."""
        key = (f"{value.dtype}{value.shape}", value.tobytes())
        if key not in self.shared:
            self.shared[key] = self.constant(base, value)
        return self.shared[key]

    def dequantize(self, base: str, tensor: QuantizedTensor) -> tuple[list[onnx.NodeProto], str]:
        """Initializers for ``tensor`` and the DequantizeLinear reading them; returns its output."""
        storage = helper.tensor_dtype_to_np_dtype(tensor.storage_type)  # ml_dtypes int2/int4
        if tensor.packed_bits:
            unsigned = tensor.storage_type in (TensorProto.UINT2, TensorProto.UINT4, TensorProto.UINT8)
            nodes, codes = unpack_nodes(f"{base}_quantized", tensor.integers, tensor.packed_bits,
                                        0 if unsigned else -(1 << (tensor.packed_bits - 1)), tensor.storage_type,
                                        self.constant, self.fresh, self.shared_constant)
            self.unpacking.extend(nodes)
        else:
            codes = self.constant(f"{base}_quantized", tensor.integers.astype(storage))  # packed in raw_data
        inputs = [codes, self.constant(f"{base}_scale", np.asarray(tensor.scale, float_dtype(tensor)))]
        if tensor.zero_point is not None:
            inputs.append(self.constant(f"{base}_zero_point", np.asarray(tensor.zero_point).astype(storage)))
        deq = self.fresh(f"{base}_dequantized")
        node = helper.make_node("DequantizeLinear", inputs, [deq], name=self.fresh(f"{base}_DequantizeLinear"),
                                **tensor.attributes())
        return [node], deq

    def subtract_offsets(self, gemm: onnx.NodeProto, tensor: QuantizedTensor, gain: float) -> list[onnx.NodeProto]:
        """Float zero points (backends/portable.py rule 6) on the activation's side of ``gemm``
        (``x [N, f] -> Gemm(x, W)`` with W dequantized without them): a group's weights are
        ``scale * q - offset`` (``offset = scale * zero_point``), so the layer's output is the
        Gemm's less ``gain * blocksums(x) @ T``, with T [groups, n] the offsets.
        The weight stays ``DequantizeLinear -> Gemm`` (not folded to floats by onnxruntime, as a
        ``Sub`` on the weight would be); the extra work is a [N, groups] x [groups, n] MatMul.
        Returns the nodes to put after ``gemm``, whose output they take over."""
        assert tensor.offset is not None
        dtype = float_dtype(tensor)
        n, f = tensor.integers.shape
        offset = np.asarray(tensor.offset, np.float64).reshape(n, -1) if np.ndim(tensor.offset) else np.full(
            (n, 1), float(tensor.offset))
        groups = offset.shape[1]
        width = tensor.block_size if groups > 1 else f
        base, activation = gemm.output[0], gemm.input[0]
        matrix = self.constant(f"{base}_offsets", np.ascontiguousarray((gain * offset).T, dtype))
        sums, correction, before = (self.fresh(f"{base}_{part}")
                                    for part in ("input_sums", "offset_term", "before_offsets"))
        nodes = []
        if groups == 1:
            axes = self.constant(f"{base}_sum_axes", np.array([1], np.int64))
            nodes.append(helper.make_node("ReduceSum", [activation, axes], [sums], keepdims=1))
        else:
            padded, blocks = activation, self.fresh(f"{base}_input_blocks")
            if groups * width != f:  # the short last block, padded with zeros
                padded = self.fresh(f"{base}_input_padded")
                pads = self.constant(f"{base}_pads", np.array([0, 0, 0, groups * width - f], np.int64))
                nodes.append(helper.make_node("Pad", [activation, pads], [padded]))
            shape = self.constant(f"{base}_block_shape", np.array([-1, groups, width], np.int64))
            axes = self.constant(f"{base}_sum_axes", np.array([2], np.int64))
            nodes += [helper.make_node("Reshape", [padded, shape], [blocks]),
                      helper.make_node("ReduceSum", [blocks, axes], [sums], keepdims=0)]
        gemm.output[0] = before
        return nodes + [helper.make_node("MatMul", [sums, matrix], [correction]),
                        helper.make_node("Sub", [before, correction], [base], name=self.fresh(f"{base}_offsets"))]

    def quantize_activation(self, activation: str,
                            quant: ActivationQuantization | None) -> tuple[list[onnx.NodeProto], str]:
        """QuantizeLinear -> DequantizeLinear on ``activation`` (nothing when ``quant`` is None);
        returns the nodes and the tensor to read instead."""
        if quant is None:
            return [], activation
        storage = helper.tensor_dtype_to_np_dtype(quant.storage_type)
        scale = self.constant(f"{activation}_scale", np.array(quant.scale, np.float32))
        zero_point = self.constant(f"{activation}_zero_point", np.array(quant.zero_point, storage))
        quantized, deq = self.fresh(f"{activation}_quantized"), self.fresh(f"{activation}_dequantized")
        return [
            helper.make_node("QuantizeLinear", [activation, scale, zero_point], [quantized],
                             name=self.fresh(f"{activation}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [deq],
                             name=self.fresh(f"{activation}_DequantizeLinear")),
        ], deq

    def add_to_output(self, nodes: list[onnx.NodeProto], addend: str, label: str) -> list[onnx.NodeProto]:
        """Rename the last node's output and add ``addend`` to it under the original name."""
        output = nodes[-1].output[0]
        before = self.fresh(f"{output}_before_{label}")
        nodes[-1].output[0] = before
        return [helper.make_node("Add", [before, addend], [output], name=self.fresh(f"{output}_{label}"))]


def _import_opsets(model: onnx.ModelProto, opsets: dict[str, int]) -> None:
    for domain, version in opsets.items():
        present = next((o for o in model.opset_import if o.domain == domain), None)
        if present is None:
            model.opset_import.append(helper.make_opsetid(domain, version))
        else:
            present.version = max(present.version, version)


def _only_reader(graphs: list[onnx.GraphProto], weight: QuantizedWeight) -> tuple[int, int]:
    """(graph, node) positions of the one node, in any graph, that reads the weight."""
    readers = [(g, i) for g, body in enumerate(graphs) for i, node in enumerate(body.node) if weight.name in node.input]
    if len(readers) != 1:
        raise ValueError(f"initializer '{weight.name}' is read by {len(readers)} nodes; expected exactly one")
    node = graphs[readers[0][0]].node[readers[0][1]]
    if node.op_type != weight.form.op_type or list(node.input).index(weight.name) != 1:
        raise ValueError(f"initializer '{weight.name}' is not the weight (input B) of a {weight.form.op_type}")
    return readers[0]


def _remove(container, names: set[str]) -> None:
    kept = [item for item in container if item.name not in names]
    del container[:]
    container.extend(kept)
