"""The pass contract (after onnx_ir's pass infrastructure): ``call(model) -> PassResult``.

A pass returns a new model and never mutates the one it is given; ``run_passes`` applies a
visible sequence, says whether any pass changed the model, and names the pass that failed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

import onnx

from .errors import PassError, PassFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    model: onnx.ModelProto
    modified: bool


class GraphPass(Protocol):
    """A pass returns a new model; the model it was given is left untouched."""

    def call(self, model: onnx.ModelProto) -> PassResult: ...


def run_passes(model: onnx.ModelProto, passes: Sequence[GraphPass]) -> PassResult:
    """Apply the passes in order. A pass that refuses the model for a reason of its own raises
    its PassError; any other failure (onnx, or a callable the pass was given) is a PassFailed
    naming the pass, the original exception its ``__cause__``."""
    modified = False
    for graph_pass in passes:
        name = type(graph_pass).__name__
        try:
            result = graph_pass.call(model)
        except PassError:
            raise
        except Exception as exc:  # onnx and onnxruntime raise many unrelated types
            raise PassFailed(f"graph pass {name} failed: {exc}") from exc
        log.debug("pass %s: %s", name, "modified the model" if result.modified else "no change")
        model, modified = result.model, modified or result.modified
    return PassResult(model, modified)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied
