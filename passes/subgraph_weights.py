"""Make the dense layers inside If/Loop/Scan bodies look like the main graph's to discovery,
calibration and the rewrite, without changing what the model computes.

- A body's ``Constant`` tensors and initializers move to the main graph as initializers of the
  same name (tensor names are unique across a model, so every reader still finds them): weights
  are then main-graph initializers wherever their layer lives, as forms/ expect. A constant that
  is itself a body output stays where it is.
- A dense node in a body whose activation comes from an enclosing graph reads it through an
  ``Identity`` inside its body, so that the tensor calibration captures is the one the layer
  sees in its body (only on the batches where an If branch ran, once per Loop iteration), not
  the outer value.
"""

from __future__ import annotations

import logging

import onnx
from onnx import helper

from .base import PassResult, copy_model
from .fold_weights import DEFAULT_DOMAINS, DENSE_OPS, _is_tensor_constant
from .graphs import fresh_name, local_names, names_used, subgraphs

log = logging.getLogger(__name__)


class PrepareSubgraphs:
    def call(self, model: onnx.ModelProto) -> PassResult:
        if not any(subgraphs(node) for node in model.graph.node):
            return PassResult(model, modified=False)
        out = copy_model(model)
        main = out.graph
        used = names_used(main)
        modified = False
        for node in main.node:
            for _, body in subgraphs(node):
                modified |= _prepare(body, main, used)
        return PassResult(out if modified else model, modified)


def _prepare(body: onnx.GraphProto, main: onnx.GraphProto, used: set[str]) -> bool:
    """Hoist ``body``'s constants into ``main`` and localize its dense inputs (recursively)."""
    modified = False
    for node in body.node:
        for _, inner in subgraphs(node):
            modified |= _prepare(inner, main, used)
    outputs = {v.name for v in body.output}
    kept = []
    for node in body.node:
        if _is_tensor_constant(node) and node.output[0] not in outputs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            main.initializer.append(tensor)
            modified = True
        else:
            kept.append(node)
    inputs = {v.name for v in body.input}
    hoisted = [init for init in body.initializer if init.name not in outputs | inputs]
    main.initializer.extend(hoisted)
    remaining = [init for init in body.initializer if init.name in outputs | inputs]
    if hoisted:
        del body.initializer[:]
        body.initializer.extend(remaining)
        modified = True
    initializers = {init.name for init in main.initializer}
    local = local_names(body) - {init.name for init in hoisted}
    identities = []
    for node in kept:
        dense = node.op_type in DENSE_OPS and node.domain in DEFAULT_DOMAINS and len(node.input) > 1
        if dense and node.input[1] in initializers and node.input[0] not in local | initializers:
            name = fresh_name(used, f"{node.input[0]}_in_{node.name or node.op_type}")
            identities.append(helper.make_node("Identity", [node.input[0]], [name], name=fresh_name(used, name)))
            log.info("'%s' in a subgraph reads '%s' from an enclosing graph: through an Identity in its body",
                     node.name, node.input[0])
            node.input[0] = name
    if identities or len(kept) != len(body.node):
        del body.node[:]
        body.node.extend(identities + kept)
        modified = True
    return modified
