"""Validate a model with onnx's full checker (shape and type inference included)."""

from __future__ import annotations

import onnx
from onnx import helper
from onnx.external_data_helper import uses_external_data

from .base import PassResult, copy_model
from .graphs import all_graphs


class CheckModel:
    """Raises ``onnx.checker.ValidationError`` (or an inference error) on an invalid model.

    Initializers still in the input's external data files are checked as graph
    inputs of the same type and shape: the checker would otherwise look for their files beside
    the working directory, and their values are the input's, not ours to check. Nodes of the
    default domain that onnx does not define (onnxruntime's own, e.g. SimplifiedLayerNormalization
    in onnxruntime-genai's models) are checked as nodes of a domain the checker does not know,
    which it passes over as it does ``com.microsoft`` nodes."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        checked = _without_external_initializers(model)  # a copy when it changes anything
        onnx.checker.check_model(runtime_ops_apart(checked, in_place=checked is not model), full_check=True)
        return PassResult(model, modified=False)


RUNTIME_DOMAIN = "onnx_qubo.runtime_ops"  # where runtime_ops_apart puts the ops onnx does not define


def runtime_ops_apart(model: onnx.ModelProto, in_place: bool = False) -> onnx.ModelProto:
    """``model``, or a copy (``model`` itself if ``in_place``) whose default-domain nodes that onnx
    has no schema for are in RUNTIME_DOMAIN."""
    unknown = {node.op_type for graph in all_graphs(model.graph) for node in graph.node
               if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, "")}
    if not unknown:
        return model
    checked = model if in_place else copy_model(model)
    for graph in all_graphs(checked.graph):
        for node in graph.node:
            if node.domain in ("", "ai.onnx") and node.op_type in unknown:
                node.domain = RUNTIME_DOMAIN
    checked.opset_import.append(helper.make_opsetid(RUNTIME_DOMAIN, 1))
    return checked


def runtime_ops_back(model: onnx.ModelProto) -> onnx.ModelProto:
    """Undo ``runtime_ops_apart`` in place on ``model`` (a copy it made); returns ``model``."""
    for graph in all_graphs(model.graph):
        for node in graph.node:
            if node.domain == RUNTIME_DOMAIN:
                node.domain = ""
    kept = [opset for opset in model.opset_import if opset.domain != RUNTIME_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model



def _without_external_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    external = [init for init in model.graph.initializer if uses_external_data(init)]
    if not external:
        return model
    checked = copy_model(model)
    graph = checked.graph
    declared = {inp.name for inp in graph.input}
    kept = [init for init in graph.initializer if not uses_external_data(init)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                       for init in external if init.name not in declared)
    return checked
