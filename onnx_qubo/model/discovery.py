"""Find the dense layers of an ONNX graph, and say why every other candidate node was skipped.

Each node whose op type has a form (forms/) is matched by that form: the result is a layer to
quantize or a reason it cannot be quantized exactly. Dense nodes inside If branches and Loop/Scan
bodies are matched too (named ``<holder>/<attribute>/<node>``, e.g. ``If_0/then_branch/fc``);
calibration captures their inputs through subgraphs.expose. Weight-bearing nodes no form handles
(ConvTranspose) and dense nodes in the bodies of other ops are listed as skipped with the
reason, never silently invisible.
"""

from __future__ import annotations

import logging

import onnx

from ..core.types import DenseLayer, SkippedNode
from ..forms import FORMS, GraphIndex, Skip
from ..graph.subgraphs import all_graphs, capture_problem, is_routed, node_names, subgraphs

log = logging.getLogger(__name__)

UNSUPPORTED = {  # op type -> why its weights stay float
    "ConvTranspose": "transposed convolution: not quantized yet",
}


def find_dense_layers(model: onnx.ModelProto) -> tuple[list[DenseLayer], list[SkippedNode]]:
    """Return the quantizable dense layers (main graph and If/Loop/Scan bodies, in graph
    order, a body's layers after the nodes before its holder) and the skipped candidate nodes."""
    layers: list[DenseLayer] = []
    skipped: list[SkippedNode] = []
    _visit(model.graph, "", GraphIndex(model), layers, skipped, None)
    for node in skipped:
        log.info("skipped %s '%s': %s", node.op_type, node.name, node.reason)
    return layers, skipped


def _visit(graph: onnx.GraphProto, prefix: str, index: GraphIndex, layers: list[DenseLayer],
           skipped: list[SkippedNode], unroutable: str | None, holders: tuple[onnx.NodeProto, ...] = ()) -> None:
    """Match the nodes of ``graph`` (names prefixed by ``prefix``; ``holders``: the nodes holding
    it, outer first); ``unroutable``: why a layer found here cannot be calibrated (inside the body
    of an op other than If/Loop/Scan, or an If branch inside a Scan: subgraphs.capture_problem)."""
    for node, name in zip(graph.node, node_names(graph)):
        name = prefix + name
        default_domain = node.domain in ("", "ai.onnx")
        form = FORMS.get(node.op_type) if default_domain else None
        found = form.match(node, name, index) if form is not None else None
        if default_domain and node.op_type in UNSUPPORTED:
            found = Skip(UNSUPPORTED[node.op_type])
        if unroutable is not None and found is not None:
            found = Skip(unroutable)
        if isinstance(found, Skip):
            skipped.append(SkippedNode(name, node.op_type, found.reason))
        elif found is not None:
            layers.append(found)
        for attr, body in subgraphs(node):
            why = unroutable
            if why is None and not is_routed(node):
                why = (f"inside the {attr} subgraph of {node.op_type} '{name}': only If, Loop and Scan bodies "
                       "are quantized")
            elif why is None and (problem := capture_problem((*holders, node))) is not None:
                why = f"its input cannot be captured for calibration: {problem}"
            _visit(body, f"{name}/{attr}/", index.scoped(body), layers, skipped, why, (*holders, node))


def fed_by_earlier(model: onnx.ModelProto, layers: list[DenseLayer]) -> list[bool]:
    """For each layer (graph order), whether its input depends on an earlier layer's output: only
    then can quantizing the earlier ones (``sequential``) change what it sees."""
    return [feeder >= 0 for feeder in latest_feeders(model, layers)]


def latest_feeders(model: onnx.ModelProto, layers: list[DenseLayer]) -> list[int]:
    """For each layer (graph order), the index of the last earlier layer whose output its input
    depends on (-1: none). Statistics gathered once that layer is quantized stay the layer's
    whatever is quantized after it. Across bodies, a node holding a body depends on everything
    inside it, and a body's inputs on its holder."""
    graphs = all_graphs(model.graph)
    producers: dict[str, onnx.NodeProto] = {}
    inner: dict[int, list[str]] = {}  # id(holder) -> every name its bodies read or write
    readers: dict[str, onnx.NodeProto] = {}  # a layer's node reads its weight
    for graph in graphs:
        for node in graph.node:
            producers.update((out, node) for out in node.output)
            readers.update((name, node) for name in node.input[1:2])
            for _, body in subgraphs(node):
                producers.update((v.name, node) for v in body.input)
                inner.setdefault(id(node), []).extend(
                    name for g in all_graphs(body) for n in g.node for name in [*n.input, *n.output] if name)
    earlier: dict[str, int] = {}  # an earlier layer's output -> the index of the last layer writing it
    feeders = []
    ancestors: dict[tuple[str, ...], set[str]] = {}  # per input tensors (the groups of a Conv share them)
    for k, layer in enumerate(layers):
        if layer.input_tensors not in ancestors:
            seen, stack = set(), list(layer.input_tensors)  # a recurrent node's: X, Y, initial_h...
            while stack:
                tensor = stack.pop()
                if tensor in seen:
                    continue
                seen.add(tensor)
                node = producers.get(tensor)
                if node is not None:
                    stack.extend(name for name in [*node.input, *inner.get(id(node), [])] if name)
            ancestors[layer.input_tensors] = seen
        feeders.append(max((earlier[name] for name in ancestors[layer.input_tensors] if name in earlier), default=-1))
        node = readers.get(layer.weight_name)
        earlier.update((name, k) for name in (node.output if node is not None else ()))
    return feeders


# ops whose first input reaches their output value by value (shape steps, element-wise functions):
# a layer seen through them still is what the model outputs; their other inputs are shapes or axes
VALUE_STEPS = {"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Softmax",
               "LogSoftmax", "Sigmoid", "Tanh", "Relu", "Clip", "Exp", "Log", "Neg"}
# the same with a constant other operand (a bias, a scale), or one computed from the first alone (a softmax
# written out: x - max(x), exp, / sum, as jax2tf and tf2onnx export it)
OPERAND_STEPS = {"Add", "Sub", "Mul", "Div"}
OWN_STEPS = 16  # the most nodes followed to see that an operand is computed from the other alone


def output_layers(model: onnx.ModelProto, layers: list[DenseLayer]) -> list[str]:
    """The layers (owner names) whose output is a main-graph output up to ``VALUE_STEPS`` and
    ``OPERAND_STEPS`` whose other operand is constant or computed from the first alone: a language
    model's head, a classifier's last layer (its softmax written out included). A residual Add,
    whose branch layers compute, stops the walk: a transformer's last block is not one."""
    graph = model.graph
    owners = {layer.owner for layer in layers}
    names = node_names(graph)
    layer_nodes = {k for k, name in enumerate(names) if name in owners}
    producers = {out: k for k, node in enumerate(graph.node) for out in node.output}
    constants = {init.name for init in graph.initializer} | {
        node.output[0] for node in graph.node if node.op_type == "Constant" and node.output}
    found: list[str] = []
    for output in graph.output:
        tensor = output.name
        while (k := producers.get(tensor)) is not None:
            node = graph.node[k]
            if k in layer_nodes:
                found += [names[k]] if names[k] not in found else []
                break
            computed = [name for name in node.input if name and name not in constants]
            if node.domain not in ("", "ai.onnx"):
                break
            if node.op_type in VALUE_STEPS and node.input and node.input[0] in computed:
                tensor = node.input[0]
            elif node.op_type in OPERAND_STEPS and len(computed) == 1:
                tensor = computed[0]
            elif node.op_type in OPERAND_STEPS and len(computed) == 2 and (own := [
                    x for x, other in zip(computed, computed[::-1])
                    if _computed_from(graph, producers, constants, layer_nodes, other, x)]):
                tensor = own[0]
            else:
                break
    return found


def _computed_from(graph: onnx.GraphProto, producers: dict[str, int], constants: set[str], layer_nodes: set[int],
                   tensor: str, source: str) -> bool:
    """Whether ``tensor`` is computed from ``source`` and constants alone (within ``OWN_STEPS`` nodes),
    through no layer's node (``layer_nodes``: a residual branch is computed from its input by layers);
    a Shape or Size reads no values: a broadcast to the input's shape is a constant here."""
    stack, seen = [tensor], set()
    while stack:
        name = stack.pop()
        if name == source or name in constants or name in seen:
            continue
        seen.add(name)
        k = producers.get(name)
        if k is None or len(seen) > OWN_STEPS or k in layer_nodes:
            return False
        if graph.node[k].op_type not in ("Shape", "Size"):
            stack += [x for x in graph.node[k].input if x]
    return True
