"""Graphs inside graphs: walking a model's If/Loop/Scan bodies, and routing a tensor of a body
out to the main graph so that onnxruntime can return it (calibration).

onnxruntime returns main-graph outputs only. ``expose`` adds, in a copy of the model, each
requested body tensor as an extra output of its body and of the node holding the body, up to the
main graph:

- ``If``: an extra output of the branch holding the tensor; every other branch yields an empty
  tensor of the same element type in that place, so a batch where the branch did not run gives
  no rows (the layer did not run on it either);
- ``Loop`` / ``Scan``: an extra scan output of the body, so the value of every iteration comes
  out, stacked on a new first axis that ``Exposed.rows`` folds into the batch axis.

Tensor names are unique across a model and its subgraphs (ONNX's SSA rule), so a name alone says
where a tensor lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROUTED_OPS = ("If", "Loop", "Scan")  # bodies whose tensors ``expose`` can route out
DEFAULT_DOMAINS = ("", "ai.onnx")


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """The (attribute name, graph) bodies a node holds."""
    found = []
    for attr in node.attribute:
        if attr.HasField("g"):
            found.append((attr.name, attr.g))
        found.extend((attr.name, g) for g in attr.graphs)
    return found


def is_routed(node: onnx.NodeProto) -> bool:
    """Whether ``node``'s bodies are ones whose tensors can be captured (If, Loop, Scan)."""
    return node.op_type in ROUTED_OPS and node.domain in DEFAULT_DOMAINS


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


@dataclass(frozen=True)
class Placement:
    """Where a tensor lives: its graph, and the chain of (holder node, its graph) from the
    main graph down to that graph's holder (empty for the main graph)."""

    graph: onnx.GraphProto
    holders: tuple[tuple[onnx.NodeProto, onnx.GraphProto], ...]


def placements(model: onnx.ModelProto) -> dict[str, Placement]:
    """Every tensor defined in ``model`` -> where it lives (references into ``model``)."""
    found: dict[str, Placement] = {}

    def visit(graph: onnx.GraphProto, holders: tuple[tuple[onnx.NodeProto, onnx.GraphProto], ...]) -> None:
        for name in local_names(graph):
            found.setdefault(name, Placement(graph, holders))
        for node in graph.node:
            for _, sub in subgraphs(node):
                visit(sub, holders + ((node, graph),))

    visit(model.graph, ())
    return found


@dataclass(frozen=True)
class Exposed:
    """How a tensor comes out of the exposed model: the main-graph output carrying it, and how
    many Loop/Scan levels stacked one value per iteration on new leading axes."""

    output: str
    levels: int = 0

    def rows(self, value: np.ndarray) -> np.ndarray:
        """The captured value with the iteration axes folded into its batch axis (an empty array
        when the branch holding it did not run)."""
        return value.reshape(-1, *value.shape[self.levels + 1:]) if self.levels else value


def expose(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, dict[str, Exposed]]:
    """A copy of ``model`` that also outputs each named tensor (module docstring), and how to
    read each one back. A ValueError for a tensor that is not in the model or sits in a body of
    another op than If, Loop or Scan."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    where = placements(exposed)
    types: dict[str, int] | None = None  # inferred once, when a body tensor is routed
    used = names_used(exposed.graph)
    present = {out.name for out in exposed.graph.output}
    result = {}
    for name in names:
        if name not in where:
            raise ValueError(f"tensor '{name}' is not in the model")
        place = where[name]
        tensor, levels, graph = name, 0, place.graph
        for holder, parent in reversed(place.holders):
            if not is_routed(holder):
                raise ValueError(f"tensor '{name}' is inside a {holder.op_type} body; only If, Loop and Scan "
                                 "bodies can be captured")
            types = _element_types(exposed) if types is None else types
            elem = types.get(name, onnx.TensorProto.FLOAT)
            inner = fresh_name(used, f"{name}_captured")
            graph.node.append(helper.make_node("Identity", [tensor], [inner]))
            graph.output.append(helper.make_tensor_value_info(inner, elem, None))
            if holder.op_type == "If":
                for _, branch in subgraphs(holder):
                    if branch is not graph:
                        empty = fresh_name(used, f"{name}_not_run")
                        value = numpy_helper.from_array(np.zeros(0, helper.tensor_dtype_to_np_dtype(elem)))
                        branch.node.append(helper.make_node("Constant", [], [empty], value=value))
                        branch.output.append(helper.make_tensor_value_info(empty, elem, None))
            else:
                levels += 1
                if holder.op_type == "Scan":
                    _extend_scan_attributes(holder)
            tensor = fresh_name(used, f"{name}_out")
            holder.output.append(tensor)
            graph = parent
        if tensor not in present:
            exposed.graph.output.append(onnx.ValueInfoProto(name=tensor))
            present.add(tensor)
        result[name] = Exposed(tensor, levels)
    return exposed, result


def _extend_scan_attributes(scan: onnx.NodeProto) -> None:
    """One more scan output: stacked on axis 0, forward (when the node lists them per output)."""
    for attr in scan.attribute:
        if attr.name in ("scan_output_axes", "scan_output_directions"):
            attr.ints.append(0)


def fresh_name(used: set[str], base: str) -> str:
    """``base``, or ``base_<k>`` with the first k that no name in ``used`` has; recorded in ``used``."""
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor shape inference can tell, subgraphs included."""
    from .forms.base import _skeleton  # inference on the graph alone, without large values

    inferred = onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=False)
    return {info.name: info.type.tensor_type.elem_type
            for graph in all_graphs(inferred.graph)
            for info in list(graph.input) + list(graph.value_info) + list(graph.output)
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type}
