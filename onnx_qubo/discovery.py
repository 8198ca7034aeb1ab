"""Find the dense layers of an ONNX graph, and say why every other Gemm/MatMul was skipped.

A dense layer is ``Gemm`` with a constant weight ``B`` (any transB, alpha, beta, optional C,
transA=0) or ``MatMul(x, W)`` with a constant 2-D ``W`` (2-D or N-D activations, optionally
followed by ``Add`` with a constant bias). Anything we cannot quantize exactly is reported as
skipped with a reason rather than mis-quantized.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from .types import DenseLayer, SkippedNode

SUPPORTED_WEIGHT_TYPES = (onnx.TensorProto.FLOAT,)


def find_dense_layers(model: onnx.ModelProto) -> tuple[list[DenseLayer], list[SkippedNode]]:
    """Return the quantizable dense layers of the main graph and the skipped Gemm/MatMul nodes."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    overridable = {inp.name for inp in graph.input} & initializers.keys()
    graph_outputs = {out.name for out in graph.output}
    uses = _count_uses(graph)
    consumers = _consumers(graph)
    names = node_names(graph)
    ranks = tensor_ranks(model)

    layers: list[DenseLayer] = []
    skipped: list[SkippedNode] = []
    for node, name in zip(graph.node, names):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gemm", "MatMul"):
            continue
        activation, weight_name = node.input[0], node.input[1]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

        def skip(reason: str) -> None:
            skipped.append(SkippedNode(name, node.op_type, reason))

        if node.op_type == "Gemm" and attrs.get("transA", 0):
            skip("transA=1 (the activation is transposed); only transA=0 is supported")
            continue
        if weight_name not in initializers:
            if node.op_type == "MatMul" and activation in initializers:
                skip(f"the constant '{activation}' is the left operand (W @ x); only x @ W is supported")
            else:
                skip(f"weight '{weight_name}' is not a constant initializer")
            continue
        if activation in initializers:
            skip(f"both operands are constants ('{activation}', '{weight_name}')")
            continue
        if weight_name in overridable:
            skip(f"weight '{weight_name}' is also a graph input, so callers can override it")
            continue
        if weight_name in graph_outputs:
            skip(f"weight '{weight_name}' is also a graph output, which must keep its float values")
            continue
        if uses[weight_name] > 1:
            skip(f"weight '{weight_name}' is shared by {uses[weight_name]} nodes")
            continue
        init = initializers[weight_name]
        if init.data_type not in SUPPORTED_WEIGHT_TYPES:
            type_name = onnx.TensorProto.DataType.Name(init.data_type)
            skip(f"weight '{weight_name}' is {type_name}; only FLOAT weights are supported")
            continue
        if len(init.dims) != 2:
            skip(f"weight '{weight_name}' has rank {len(init.dims)}; a dense layer needs a 2-D weight")
            continue

        stored = numpy_helper.to_array(init).astype(np.float64)
        if node.op_type == "Gemm":
            trans_b = attrs.get("transB", 0)
            weight = stored if trans_b else stored.T
            gain = float(attrs.get("alpha", 1.0))
            if gain == 0.0:
                skip("alpha=0: the weight does not contribute to the output")
                continue
            form = f"Gemm(transB={trans_b})"
            bias_name = node.input[2] if len(node.input) > 2 else ""
            bias_gain = float(attrs.get("beta", 1.0))
        else:
            weight, gain = stored.T, 1.0
            add = _constant_add(node.output[0], consumers, initializers)
            form = "MatMul+Add" if add else "MatMul"
            if ranks.get(activation) != 2:
                form += " (N-D)"
            bias_name = next((name for name in add.input if name != node.output[0]), "") if add else ""
            bias_gain = 1.0
        bias = _bias_vector(bias_name, len(weight), initializers, uses, overridable | graph_outputs,
                            2 if node.op_type == "Gemm" else ranks.get(activation))
        if bias is not None and not np.isfinite(bias).all():
            skip(f"bias '{bias_name}' holds NaN or Inf")
            continue
        layers.append(DenseLayer(name, node.op_type, form, activation, ranks.get(activation),
                                 weight_name, weight, gain, None if bias is None else bias_gain * bias,
                                 bias_name if bias is not None else None))
    return layers, skipped


def node_names(graph: onnx.GraphProto) -> list[str]:
    """Each node's name, or ``<op_type>_<index>`` where it has none, made unique."""
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(graph.node)]
    counts = Counter(names)
    return [f"{n}_{i}" if counts[n] > 1 else n for i, n in enumerate(names)]


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every main-graph tensor that shape inference can tell."""
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    return {
        info.name: len(info.type.tensor_type.shape.dim)
        for info in list(graph.input) + list(graph.value_info) + list(graph.output)
        if info.type.tensor_type.HasField("shape")
    }


def _count_uses(graph: onnx.GraphProto) -> Counter:
    """How many node inputs (subgraphs included) read each tensor name."""
    uses: Counter = Counter()
    for node in graph.node:
        uses.update(name for name in node.input if name)
        for attr in node.attribute:
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subgraphs:
                uses.update(_count_uses(sub))
    return uses


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _constant_add(output: str, consumers, initializers) -> onnx.NodeProto | None:
    """The Add that alone reads ``output`` and adds a constant to it, if there is one."""
    readers = consumers.get(output, [])
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    other = [name for name in readers[0].input if name != output]
    return readers[0] if len(other) == 1 and other[0] in initializers else None


def _bias_vector(name: str, n: int, initializers, uses, overridable, rank: int | None) -> np.ndarray | None:
    """The bias as an [n] vector when it can be replaced by a quantized one: a FLOAT
    initializer of n values along its last axis, read by this layer alone, of rank at most the
    layer output's ``rank`` (1 when unknown), so that an [n] vector broadcasts the same."""
    init = initializers.get(name)
    if init is None or name in overridable or uses[name] != 1 or init.data_type != onnx.TensorProto.FLOAT:
        return None
    dims = list(init.dims)
    if not dims or dims[-1] != n or int(np.prod(dims)) != n or len(dims) > (rank or 1):
        return None
    return numpy_helper.to_array(init).astype(np.float64).reshape(n)
