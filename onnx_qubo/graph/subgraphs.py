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

A scan output must have the same shape in every iteration, which a tensor in an If branch inside
a Loop body does not (the branch taken may change between iterations: rows, then none). Such a
tensor is routed *packed*: from its own graph up, as a flat copy of its values plus a record of
its rank and shape (``[rank, d1, ..., d_rank]``); an If's other branches yield both empty, and a
Loop concatenates both over its iterations as two extra loop-carried values (which may change
shape). ``Exposed.rows`` splits the values back by the record. A Scan cannot carry a value whose
shape changes, so a tensor in an If branch inside a Scan body cannot be captured
(``capture_problem``: discovery skips its layer with that reason).

Tensor names are unique across a model and its subgraphs (ONNX's SSA rule), so a name alone says
where a tensor lives.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..passes.graphs import all_graphs as all_graphs  # the generic walks live with the passes (passes/graphs.py)
from ..passes.graphs import fresh_name as fresh_name
from ..passes.graphs import local_names as local_names
from ..passes.graphs import names_used as names_used
from ..passes.graphs import outer_reads as outer_reads
from ..passes.graphs import subgraphs as subgraphs

SHAPE_VALUES = 1 << 10  # initializers up to this many elements keep their values for shape inference (skeleton)
ROUTED_OPS = ("If", "Loop", "Scan")  # bodies whose tensors ``expose`` can route out
DEFAULT_DOMAINS = ("", "ai.onnx")


def is_routed(node: onnx.NodeProto) -> bool:
    """Whether ``node``'s bodies are ones whose tensors can be captured (If, Loop, Scan)."""
    return node.op_type in ROUTED_OPS and node.domain in DEFAULT_DOMAINS


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


LOOPS = ("Loop", "Scan")


def packed(holders: Sequence[onnx.NodeProto]) -> bool:
    """Whether a tensor held by ``holders`` (outer first) is routed packed: it is in an If branch
    inside a Loop/Scan body, so its shape may change between iterations (module docstring)."""
    ops = [holder.op_type for holder in holders]
    first = next((k for k, op in enumerate(ops) if op in LOOPS), len(ops))
    return "If" in ops[first + 1:]


def capture_problem(holders: Sequence[onnx.NodeProto]) -> str | None:
    """Why a tensor held by ``holders`` (outer first) cannot be captured, or None when it can."""
    for holder in holders:
        if not is_routed(holder):
            return f"it is inside a {holder.op_type} body; only If, Loop and Scan bodies can be captured"
    if packed(holders) and any(holder.op_type == "Scan" for holder in holders):
        scan = next(holder for holder in holders if holder.op_type == "Scan")
        return (f"it is in an If branch inside the body of Scan '{scan.name}' (or a Loop within it): the branch "
                "taken may change between iterations, and a Scan cannot carry a value whose shape changes")
    return None


@dataclass(frozen=True)
class Exposed:
    """How a tensor comes out of the exposed model: the main-graph output carrying it, how many
    Loop/Scan levels stacked one value per iteration on new leading axes, and for a packed tensor
    (module docstring) the output holding its shape record."""

    output: str
    levels: int = 0
    shapes: str | None = None

    @property
    def outputs(self) -> list[str]:
        """The main-graph outputs to fetch: the values, then the shape record when packed."""
        return [self.output] if self.shapes is None else [self.output, self.shapes]

    def rows(self, value: np.ndarray, shapes: np.ndarray | None = None) -> np.ndarray:
        """The captured value with the iteration axes folded into its batch axis (an empty array
        when the branch holding it did not run); packed: ``value`` and ``shapes`` are the two
        outputs, and each run's value is split off and stacked on the batch axis (a ValueError
        when the runs' values differ in shape beyond that axis)."""
        if self.shapes is None:
            return value.reshape(-1, *value.shape[self.levels + 1:]) if self.levels else value
        assert shapes is not None
        parts: list[np.ndarray] = []
        at, start = 0, 0
        while at < len(shapes):
            dims = [int(d) for d in shapes[at + 1:at + 1 + int(shapes[at])]]
            size = int(np.prod(dims))
            parts.append(value[start:start + size].reshape(dims))
            at, start = at + 1 + len(dims), start + size
        if not parts:
            return value[:0]
        if len({part.shape[1:] for part in parts}) > 1:
            raise ValueError(f"its shape changes between iterations beyond the batch axis: "
                             f"{sorted({part.shape for part in parts})}")
        return np.concatenate(parts)


def expose(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, dict[str, Exposed]]:
    """A copy of ``model`` that also outputs each named tensor (module docstring), and how to
    read each one back. A ValueError for a tensor that is not in the model or cannot be
    captured (``capture_problem``)."""
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
        holders = [holder for holder, _ in place.holders]
        problem = capture_problem(holders)
        if problem is not None:
            raise ValueError(f"tensor '{name}' cannot be captured: {problem}")
        if holders:
            types = _element_types(exposed) if types is None else types
        elem = types.get(name, onnx.TensorProto.FLOAT) if types is not None else onnx.TensorProto.FLOAT
        if packed(holders):
            result[name] = _expose_packed(name, elem, place, used)
        else:
            result[name] = _expose_stacked(name, elem, place, used)
        for output in result[name].outputs:
            if output not in present:
                exposed.graph.output.append(onnx.ValueInfoProto(name=output))
                present.add(output)
    return exposed, result


def keep_only(model: onnx.ModelProto, outputs: list[str]) -> None:
    """Cut ``model`` in place down to the main-graph nodes ``outputs`` are computed from, and make
    them its only outputs: onnxruntime runs every node of a graph whatever outputs a run asks
    for, so a pass reading an early layer's input would otherwise run the whole model. A body's
    reads of the enclosing scope count as its holder's inputs; graph inputs and initializers
    stay (a feed names every input)."""
    graph = model.graph
    producer = {name: k for k, node in enumerate(graph.node) for name in node.output if name}
    needed, seen, stack = set(), set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        k = producer[name]
        if k not in needed:
            needed.add(k)
            node = graph.node[k]
            stack.extend(name for name in node.input if name)
            stack.extend(name for _, body in subgraphs(node) for name in outer_reads(body))
    wanted = set(outputs)
    kept_outputs = [value for value in graph.output if value.name in wanted]
    kept_nodes = [node for k, node in enumerate(graph.node) if k in needed]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    del graph.node[:]
    graph.node.extend(kept_nodes)


def _expose_stacked(name: str, elem: int, place: Placement, used: set[str]) -> Exposed:
    """Route ``name`` out as itself: an If's other branches yield an empty tensor, a Loop/Scan
    stacks its iterations as a scan output."""
    tensor, levels, graph = name, 0, place.graph
    for holder, parent in reversed(place.holders):
        inner = fresh_name(used, f"{name}_captured")
        graph.node.append(helper.make_node("Identity", [tensor], [inner]))
        graph.output.append(helper.make_tensor_value_info(inner, elem, None))
        if holder.op_type == "If":
            _yield_empty(holder, graph, [(f"{name}_not_run", elem)], used)
        else:
            levels += 1
            if holder.op_type == "Scan":
                _extend_scan_attributes(holder)
        tensor = fresh_name(used, f"{name}_out")
        holder.output.append(tensor)
        graph = parent
    return Exposed(tensor, levels)


def _expose_packed(name: str, elem: int, place: Placement, used: set[str]) -> Exposed:
    """Route ``name`` out packed (module docstring): its values flat and its shape record, each
    empty from an If's other branches and concatenated over a Loop's iterations."""
    graph = place.graph
    flat, record, shape, rank = (fresh_name(used, f"{name}_{part}") for part in ("flat", "shapes", "shape", "rank"))
    minus_one = fresh_name(used, f"{name}_minus_one")
    graph.node.extend([
        helper.make_node("Constant", [], [minus_one], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Reshape", [name, minus_one], [flat]),
        helper.make_node("Shape", [name], [shape]),
        helper.make_node("Shape", [shape], [rank]),
        helper.make_node("Concat", [rank, shape], [record], axis=0)])
    pair = [(flat, elem), (record, onnx.TensorProto.INT64)]
    for holder, parent in reversed(place.holders):
        for tensor, kind in pair:
            graph.output.append(helper.make_tensor_value_info(tensor, kind, None))
        if holder.op_type == "If":
            _yield_empty(holder, graph, [(f"{name}_not_run", kind) for _, kind in pair], used)
            outer = [(fresh_name(used, f"{name}_out"), kind) for _, kind in pair]
            holder.output.extend(tensor for tensor, _ in outer)
        else:  # a Loop (capture_problem refuses a Scan here): two more loop-carried values
            outer = _carry_concatenated(holder, graph, parent, name, pair, used)
        pair, graph = outer, parent
    return Exposed(pair[0][0], shapes=pair[1][0])


def _yield_empty(holder: onnx.NodeProto, graph: onnx.GraphProto, values: list[tuple[str, int]],
                 used: set[str]) -> None:
    """In each branch of If ``holder`` other than ``graph``, one more output per (base name,
    element type) in ``values``: an empty 1-D tensor of that type."""
    for _, branch in subgraphs(holder):
        if branch is graph:
            continue
        for base, elem in values:
            empty = fresh_name(used, base)
            value = numpy_helper.from_array(np.zeros(0, helper.tensor_dtype_to_np_dtype(elem)))
            branch.node.append(helper.make_node("Constant", [], [empty], value=value))
            branch.output.append(helper.make_tensor_value_info(empty, elem, None))


def _carry_concatenated(loop: onnx.NodeProto, body: onnx.GraphProto,
                        parent: onnx.GraphProto, name: str, pair: list[tuple[str, int]],
                        used: set[str]) -> list[tuple[str, int]]:
    """Make each body tensor of ``pair`` a loop-carried value of ``loop`` concatenated over the
    iterations (from an empty start), and return the loop's outputs carrying them. The body
    outputs just appended for ``pair`` are replaced by the concatenations, placed among the
    carried values (before the scan outputs), as the Loop's outputs are."""
    carried = len(loop.input) - 2  # Loop inputs: M, cond, then the carried values
    del body.output[len(body.output) - len(pair):]
    outer = []
    for k, (tensor, elem) in enumerate(pair):
        start, before, after = (fresh_name(used, f"{name}_{part}") for part in ("start", "before", "after"))
        value = numpy_helper.from_array(np.zeros(0, helper.tensor_dtype_to_np_dtype(elem)))
        parent.node.insert(0, helper.make_node("Constant", [], [start], value=value))
        loop.input.append(start)
        body.input.append(helper.make_tensor_value_info(before, elem, None))
        body.node.append(helper.make_node("Concat", [before, tensor], [after], axis=0))
        body.output.insert(1 + carried + k, helper.make_tensor_value_info(after, elem, None))
        final = fresh_name(used, f"{name}_out")
        loop.output.insert(carried + k, final)
        outer.append((final, elem))
    return outer


def _extend_scan_attributes(scan: onnx.NodeProto) -> None:
    """One more scan output: stacked on axis 0, forward (when the node lists them per output)."""
    for attr in scan.attribute:
        if attr.name in ("scan_output_axes", "scan_output_directions"):
            attr.ints.append(0)


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor shape inference can tell, subgraphs included (tolerant
    inference: ``passes.shapes.tensor_types``)."""
    from ..passes.shapes import tensor_types

    return {name: kind.tensor_type.elem_type for name, kind in tensor_types(skeleton(model)).items()
            if kind.tensor_type.elem_type}


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the values of initializers over SHAPE_VALUES elements."""
    source = model.graph
    graph = onnx.GraphProto(name=source.name, node=source.node, input=source.input, output=source.output,
                            value_info=source.value_info)
    for init in source.initializer:
        small = int(np.prod(init.dims)) <= SHAPE_VALUES
        graph.initializer.append(init if small else onnx.TensorProto(name=init.name, data_type=init.data_type,
                                                                     dims=init.dims))
    return onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions,
                           graph=graph)


def node_names(graph: onnx.GraphProto) -> list[str]:
    """Each node's name, or ``<op_type>_<index>`` where it has none, made unique."""
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(graph.node)]
    counts = Counter(names)
    return [f"{n}_{i}" if counts[n] > 1 else n for i, n in enumerate(names)]
