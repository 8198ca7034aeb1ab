"""Create onnxruntime CPU sessions for in-memory models and run them, with a clear error when one
fails to load or run: a ModelError for the caller's model, a RuntimeFailure for one this library
built. Weights may be in the proto, left in the input's external data files (external.py), or
past protobuf's 2 GB limit (then saved to a temporary folder with external data and loaded by
path)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from ..core.errors import ModelError, QuboError, RuntimeFailure
from ..core.external import materialize, session_folder

PROTOBUF_LIMIT = 2 ** 31 - 2 ** 24  # a serialized model must stay under 2 GB; keep a margin

ORT_ERRORS = tuple(kind for kind in vars(_ort_state).values()  # what onnxruntime raises when a run fails
                   if isinstance(kind, type) and issubclass(kind, Exception))

DEFAULT = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what users get without options
BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
NONE = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def make_session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel = DEFAULT,
                 what: str = "the model", built: bool = False, lean: bool = False) -> ort.InferenceSession:
    """An InferenceSession on the CPU provider at the given graph optimization level; ``built``:
    the model is one this library wrote (a failure is then a RuntimeFailure, exit 4); ``lean``:
    without onnxruntime's memory arena and memory patterns, which otherwise keep every buffer of a
    run (a DequantizeLinear model's float weights included) for the session's lifetime: for the
    runs that calibrate and check, where memory matters more than the last millisecond. Weights
    stay prepacked although that is a second copy of each MatMul weight: without it MatMulNBits
    at accuracy level 4 runs another kernel than the deployed model's, and MatMul's result
    depends on how many rows a run has (calibration in pieces would change the statistics)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 4  # fatal only: a failed run is reported as one error (run_session)
    if lean:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    folder = session_folder(model)
    if folder is not None:  # weights left in the input's external data files (external.py)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix="onnx-qubo-") as folder_name:  # over protobuf's limit: by path
            path = Path(folder_name) / "model.onnx"
            whole = onnx.ModelProto()
            whole.CopyFrom(model)
            materialize(whole)
            onnx.save_model(whole, path, save_as_external_data=True, location="model.onnx.data")
            del whole
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        error: type[QuboError] = RuntimeFailure if built else ModelError
        raise error(f"onnxruntime cannot load {what}: {exc}") from None


def run_session(session: ort.InferenceSession, outputs: Sequence[str] | None, feed: Mapping[str, np.ndarray],
                what: str, origin: str, built: bool = False) -> list[np.ndarray]:
    """``session.run``; a failure (a Conv group that does not divide its input's channels, a kernel
    larger than its input, Gather indices out of range: what the graph asks of the data) is one
    line naming the node: a ModelError for the caller's model, a RuntimeFailure for one this
    library built (``built``). ``what``: the model, ``origin``: the data, as messages name them."""
    try:
        return session.run(outputs, dict(feed))
    except ORT_ERRORS as exc:
        error: type[QuboError] = RuntimeFailure if built else ModelError
        raise error(f"onnxruntime cannot run {what} on {origin}: {failed_node(str(exc))}") from None


def failed_node(message: str) -> str:
    """onnxruntime's message for a failed run in one line, led by the node it names (the innermost,
    for a node inside a Loop/If/Scan body): ``node 'conv' (Conv): <status message>``."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", message).split())
    nodes = re.findall(r"running (\w+) node\. Name:'([^']*)' Status Message: ", text)
    if not nodes:
        return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    op, name = nodes[-1]
    detail = text.rsplit(" Status Message: ", 1)[1]
    return f"{f'node {name!r}' if name else 'an unnamed node'} ({op}): {detail}"
