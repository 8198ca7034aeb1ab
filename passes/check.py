"""Validate a model with onnx's full checker (shape and type inference included)."""

from __future__ import annotations

import onnx
from onnx import helper
from onnx.external_data_helper import uses_external_data

from .base import PassResult, copy_model


class CheckModel:
    """Raises ``onnx.checker.ValidationError`` (or an inference error) on an invalid model.

    Initializers still in the input's external data files are checked as graph
    inputs of the same type and shape: the checker would otherwise look for their files beside
    the working directory, and their values are the input's, not ours to check."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        onnx.checker.check_model(_without_external_initializers(model), full_check=True)
        return PassResult(model, modified=False)


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
