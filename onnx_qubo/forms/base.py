"""What every dense form's matching needs to know of a graph, and the checks they share.

A form (gemm.py, matmul.py) is one object per graph pattern, after onnxscript's rewrite rules:
``match`` turns a node into a ``DenseLayer`` (with its input view: ``LastAxis`` here for the
dense forms) or a ``Skip`` saying why it cannot be quantized exactly; ``lower`` rewrites the
node around the weight's integers (the ``DenseLowering`` of passes/insert_dequantize.py).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from ..calibration.grams import DenseGram
from ..core import external
from ..core.types import Accumulator, DenseLayer, FromFile, InMemory, LayerForm, WeightValues
from ..graph.subgraphs import outer_reads, skeleton, subgraphs
from ..passes.shapes import tensor_types

FLOAT_WEIGHTS = (onnx.TensorProto.FLOAT,)
HALF_OR_FLOAT_WEIGHTS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # forms whose lowering writes either


@dataclass(frozen=True)
class Skip:
    """A node of a form's op type that is not quantized, and why."""

    reason: str


class LastAxis:
    """The dense forms' input view (``types.InputView``): the last axis of the input tensor, one
    vector per leading index; the layers reading one tensor share its statistics."""

    tensors: tuple[str, ...] = ()
    positions = True
    problems = 1
    small_problems = False
    output_axes = 0
    geometry = None
    output = None
    unwritten = None

    def source(self, input_name: str, owner: str) -> str:
        return input_name

    def accumulator(self, features: int, drift: bool, owner: str, spread: bool = False) -> Accumulator:
        return DenseGram(features, drift, spread)

    def vectors(self, x: np.ndarray, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        return x


LAST_AXIS = LastAxis()


class DenseForm(LayerForm, Protocol):
    """One graph pattern of a dense layer (forms/): how to find it and how to rewrite it."""

    def match(self, node: onnx.NodeProto, name: str, index: "GraphIndex") -> DenseLayer | Skip: ...


class GraphIndex:
    """The main graph's initializers, who reads what, and tensor ranks, computed once; a node
    of a subgraph (If/Loop/Scan body) is matched with ``scoped(body)``: weights are still the
    main graph's initializers (pipeline.prepare hoists a body's constants there), readers are
    the body's nodes."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.initializers = {init.name: init for init in graph.initializer}
        self.overridable = {inp.name for inp in graph.input} & self.initializers.keys()
        self.outputs = {out.name for out in graph.output}
        self.uses = count_uses(graph)
        self.consumers = _consumers(graph)
        self.ranks = tensor_ranks(model)

    def scoped(self, body: onnx.GraphProto) -> GraphIndex:
        """This index for the nodes of ``body``: its readers, and its outputs kept float too."""
        index = copy.copy(self)
        index.outputs = self.outputs | {out.name for out in body.output}
        index.consumers = _consumers(body)
        return index

    def constant_weight(self, activation: str, weight: str, rank: int | None = 2,
                        types: tuple[int, ...] = FLOAT_WEIGHTS) -> onnx.TensorProto | Skip:
        """The initializer ``weight`` when the node may be quantized through it: a constant of one
        of ``types`` that only this node reads and that no caller can override (of ``rank``, when
        given)."""
        if weight not in self.initializers:
            return Skip(f"weight '{weight}' is not a constant initializer")
        if activation in self.initializers:
            return Skip(f"both operands are constants ('{activation}', '{weight}')")
        if weight in self.overridable:
            return Skip(f"weight '{weight}' is also a graph input, so callers can override it")
        if weight in self.outputs:
            return Skip(f"weight '{weight}' is also a graph output, which must keep its float values")
        if self.uses[weight] > 1:
            return Skip(f"weight '{weight}' is shared by {self.uses[weight]} nodes")
        init = self.initializers[weight]
        if init.data_type not in types:
            type_name = onnx.TensorProto.DataType.Name(init.data_type)
            supported = " or ".join(onnx.TensorProto.DataType.Name(t) for t in types)
            return Skip(f"weight '{weight}' is {type_name}; only {supported} weights are supported here")
        if rank is not None and len(init.dims) != rank:
            return Skip(f"weight '{weight}' has rank {len(init.dims)}; a dense layer needs a 2-D weight")
        return init

    def bias_vector(self, name: str, n: int, rank: int | None, axis: int = -1,
                    float_type: int = onnx.TensorProto.FLOAT) -> np.ndarray | Skip | None:
        """The bias as an [n] vector when it can be replaced by a quantized one: an initializer of
        the weight's ``float_type`` of n values along ``axis`` (its last, or its first for a Conv's [M]), read by
        this layer alone, of rank at most the layer output's ``rank`` (1 when unknown), so that
        an [n] vector broadcasts the same; a Skip when it holds NaN or Inf."""
        init = self.initializers.get(name)
        if init is None or name in self.overridable | self.outputs or self.uses[name] != 1:
            return None
        dims = list(init.dims)
        if (init.data_type != float_type or not dims or dims[axis] != n or int(np.prod(dims)) != n
                or len(dims) > (rank or 1)):
            return None
        bias = self.array(init).astype(np.float64).reshape(n)
        if not np.isfinite(bias).all():
            return Skip(f"bias '{name}' holds NaN or Inf")
        return bias

    def array(self, init: onnx.TensorProto) -> np.ndarray:
        """An initializer's values, from the proto or the model's external data."""
        return external.read_array(init, self.model)

    def weight_values(self, init: onnx.TensorProto, canonical: Callable[[np.ndarray], np.ndarray],
                      shape: tuple[int, int]) -> WeightValues:
        """A weight as a layer holds it: in memory (``canonical`` of the stored array), or, when it
        lives in external data, read again each time a stage needs it."""
        if uses_external_data(init):
            return FromFile(init, self.model, canonical, shape)
        return InMemory(canonical(self.array(init)))

    def only_reader(self, tensor: str) -> onnx.NodeProto | None:
        readers = self.consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 else None


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor -> the nodes of ``graph`` reading it (a node holding a body reads what it reads)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        inner = {name for _, sub in subgraphs(node) for name in outer_reads(sub)}
        for name in [*node.input, *sorted(inner - set(node.input))]:
            consumers.setdefault(name, []).append(node)
    return consumers


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def count_uses(graph: onnx.GraphProto) -> Counter:
    """How many node inputs (subgraphs included) read each tensor name."""
    uses: Counter = Counter()
    for node in graph.node:
        uses.update(name for name in node.input if name)
        for attr in node.attribute:
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subgraphs:
                uses.update(count_uses(sub))
    return uses




def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every main-graph tensor that shape inference can tell, inferred on a copy
    whose large initializers keep their type and dims but not their values (inference reads the
    values of small ones only, e.g. a Reshape's target shape): a model of any size, one over
    protobuf's 2 GB limit included, costs only its graph. Inference tolerates contrib ops and
    declared shapes that contradict it; a tensor it cannot reach keeps its declared rank
    (``passes.shapes.tensor_types``). If/Loop/Scan bodies included."""
    return {name: len(kind.tensor_type.shape.dim) for name, kind in tensor_types(skeleton(model)).items()
            if kind.tensor_type.HasField("shape")}


def transposed(stored: np.ndarray) -> np.ndarray:
    """A [f_in, n_out] weight (MatMul's, Gemm's with transB=0) as [n_out, f_in] float64."""
    return stored.astype(np.float64).T


def as_float64(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.float64)
