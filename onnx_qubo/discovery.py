"""Find the dense layers of an ONNX graph, and say why every other candidate node was skipped.

Each node whose op type has a form (forms/) is matched by that form: the result is a layer to
quantize or a reason it cannot be quantized exactly. Nothing is mis-quantized silently.
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx

from .forms import FORMS, GraphIndex, Skip
from .types import DenseLayer, SkippedNode

log = logging.getLogger(__name__)


def find_dense_layers(model: onnx.ModelProto) -> tuple[list[DenseLayer], list[SkippedNode]]:
    """Return the quantizable dense layers of the main graph and the skipped candidate nodes."""
    graph = model.graph
    index = GraphIndex(model)
    layers: list[DenseLayer] = []
    skipped: list[SkippedNode] = []
    for node, name in zip(graph.node, node_names(graph)):
        form = FORMS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if form is None:
            continue
        found = form.match(node, name, index)
        if isinstance(found, Skip):
            log.info("skipped %s '%s': %s", node.op_type, name, found.reason)
            skipped.append(SkippedNode(name, node.op_type, found.reason))
        else:
            layers.append(found)
    return layers, skipped


def node_names(graph: onnx.GraphProto) -> list[str]:
    """Each node's name, or ``<op_type>_<index>`` where it has none, made unique."""
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(graph.node)]
    counts = Counter(names)
    return [f"{n}_{i}" if counts[n] > 1 else n for i, n in enumerate(names)]
