"""Find the dense layers of an ONNX graph, and say why every other candidate node was skipped.

Each node whose op type has a form (forms/) is matched by that form: the result is a layer to
quantize or a reason it cannot be quantized exactly. Weight-bearing nodes no form handles
(ConvTranspose) and dense nodes inside subgraphs (If/Loop/Scan bodies) are listed as skipped
with the reason, never silently invisible.
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx

from .forms import FORMS, GraphIndex, Skip
from .types import DenseLayer, SkippedNode

log = logging.getLogger(__name__)

UNSUPPORTED = {  # op type -> why its weights stay float
    "ConvTranspose": "transposed convolution: not quantized yet",
}


def find_dense_layers(model: onnx.ModelProto) -> tuple[list[DenseLayer], list[SkippedNode]]:
    """Return the quantizable dense layers of the main graph and the skipped candidate nodes."""
    graph = model.graph
    index = GraphIndex(model)
    layers: list[DenseLayer] = []
    skipped: list[SkippedNode] = []
    for node, name in zip(graph.node, node_names(graph)):
        default_domain = node.domain in ("", "ai.onnx")
        form = FORMS.get(node.op_type) if default_domain else None
        found = form.match(node, name, index) if form is not None else None
        if default_domain and node.op_type in UNSUPPORTED:
            found = Skip(UNSUPPORTED[node.op_type])
        if isinstance(found, Skip):
            skipped.append(SkippedNode(name, node.op_type, found.reason))
        elif found is not None:
            layers.append(found)
        skipped += _in_subgraphs(node, name)
    for node in skipped:
        log.info("skipped %s '%s': %s", node.op_type, node.name, node.reason)
    return layers, skipped


def _in_subgraphs(node: onnx.NodeProto, name: str) -> list[SkippedNode]:
    """Dense and recurrent nodes inside the subgraphs of ``node`` (If/Loop/Scan bodies): not
    quantized, since onnxruntime cannot expose a subgraph's tensors for calibration."""
    found = []
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner, inner_name in zip(sub.node, node_names(sub)):
                if inner.op_type in FORMS or inner.op_type in UNSUPPORTED:
                    found.append(SkippedNode(f"{name}/{attr.name}/{inner_name}", inner.op_type,
                                             f"inside the {attr.name} subgraph of {node.op_type} '{name}': layers "
                                             "in subgraphs are not quantized yet"))
                found += _in_subgraphs(inner, f"{name}/{attr.name}/{inner_name}")
    return found


def node_names(graph: onnx.GraphProto) -> list[str]:
    """Each node's name, or ``<op_type>_<index>`` where it has none, made unique."""
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(graph.node)]
    counts = Counter(names)
    return [f"{n}_{i}" if counts[n] > 1 else n for i, n in enumerate(names)]


def fed_by_earlier(model: onnx.ModelProto, layers: list[DenseLayer]) -> list[bool]:
    """For each layer (graph order), whether its input depends on an earlier layer's output: only
    then can quantizing the earlier ones (``sequential``) change what it sees."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers = {name: node for node in graph.node for name in node.input[1:2]}  # a layer's node reads its weight
    earlier: set[str] = set()
    fed = []
    ancestors: dict[tuple[str, ...], set[str]] = {}  # per input tensors (the groups of a Conv share them)
    for layer in layers:
        if layer.input_tensors not in ancestors:
            seen, stack = set(), list(layer.input_tensors)  # a recurrent node's: X, Y, initial_h...
            while stack:
                tensor = stack.pop()
                if tensor in seen:
                    continue
                seen.add(tensor)
                node = producers.get(tensor)
                if node is not None:
                    stack.extend(name for name in node.input if name)
            ancestors[layer.input_tensors] = seen
        fed.append(bool(ancestors[layer.input_tensors] & earlier))
        node = readers.get(layer.weight_name)
        earlier.update(node.output if node is not None else ())
    return fed
