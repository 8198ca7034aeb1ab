"""Create onnxruntime CPU sessions for in-memory models, with a clear error when one fails: a
ModelError for the caller's model, a RuntimeFailure for one this library built."""

from __future__ import annotations

import onnx
import onnxruntime as ort

from .errors import ModelError, QuboError, RuntimeFailure

DEFAULT = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what users get without options
BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
NONE = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def make_session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel = DEFAULT,
                 what: str = "the model", built: bool = False) -> ort.InferenceSession:
    """An InferenceSession on the CPU provider at the given graph optimization level; ``built``:
    the model is one this library wrote (a failure is then a RuntimeFailure, exit 4)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        error: type[QuboError] = RuntimeFailure if built else ModelError
        raise error(f"onnxruntime cannot load {what}: {exc}") from None
