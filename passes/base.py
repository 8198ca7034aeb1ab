"""The pass contract (after onnx_ir's pass infrastructure): ``call(model) -> PassResult``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import onnx


@dataclass(frozen=True)
class PassResult:
    model: onnx.ModelProto
    modified: bool


class GraphPass(Protocol):
    """A pass returns a new model; the model it was given is left untouched."""

    def call(self, model: onnx.ModelProto) -> PassResult: ...


def run_passes(model: onnx.ModelProto, passes: Sequence[GraphPass]) -> onnx.ModelProto:
    """Apply the passes in order and return the final model."""
    for graph_pass in passes:
        model = graph_pass.call(model).model
    return model


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied
