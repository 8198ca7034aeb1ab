"""Walking a graph and its If/Loop/Scan bodies, the names it uses, and reading its tensors.

Tensor names are unique across a model and its subgraphs (ONNX's SSA rule), so a name alone says
where a tensor lives, and a fresh name must avoid every name of every body.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from .errors import UnsupportedModel

TensorReader = Callable[[onnx.TensorProto, onnx.ModelProto], np.ndarray]
"""An initializer's values, given the model holding it: how a pass reads tensors whose values may
be in external data files (the caller knows where those are; the passes do not)."""


def read_in_proto(tensor: onnx.TensorProto, model: onnx.ModelProto) -> np.ndarray:
    """The values of ``tensor`` held in the proto itself (the default ``TensorReader``); an
    UnsupportedModel naming it when they are in external data."""
    if uses_external_data(tensor):
        raise UnsupportedModel(f"tensor '{tensor.name}' refers to external data: give the pass a reader "
                               "that can load it")
    return numpy_helper.to_array(tensor)


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """The (attribute name, graph) bodies a node holds."""
    found = []
    for attr in node.attribute:
        if attr.HasField("g"):
            found.append((attr.name, attr.g))
        found.extend((attr.name, g) for g in attr.graphs)
    return found


def all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every graph nested in it, outer first."""
    found = [graph]
    for node in graph.node:
        for _, sub in subgraphs(node):
            found += all_graphs(sub)
    return found


def local_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors defined in ``graph`` itself: its inputs, initializers and node outputs."""
    names = {v.name for v in graph.input} | {init.name for init in graph.initializer}
    return names | {out for node in graph.node for out in node.output if out}


def names_used(graph: onnx.GraphProto) -> set[str]:
    """Every tensor, node and value name of ``graph`` and its subgraphs (fresh names avoid all)."""
    names: set[str] = set()
    for g in all_graphs(graph):
        names |= local_names(g) | {v.name for v in list(g.output) + list(g.value_info)}
        names |= {n.name for n in g.node} | {name for n in g.node for name in n.input}
    return names


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names that ``graph`` (its subgraphs included) reads from enclosing scopes."""
    reads = {name for node in graph.node for name in node.input if name}
    reads |= {v.name for v in graph.output}
    for node in graph.node:
        for _, sub in subgraphs(node):
            reads |= outer_reads(sub)
    return reads - local_names(graph)


def fresh_name(used: set[str], base: str) -> str:
    """``base``, or ``base_<k>`` with the first k that no name in ``used`` has; recorded in ``used``."""
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name
