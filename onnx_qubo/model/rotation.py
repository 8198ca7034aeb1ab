"""``rotate``: incoherence processing before calibration (passes/rotate.py's ``RotateInputs``).

The float model's dense layers get a random-sign block Hadamard rotation of their input space
(folded into a linear producer, else an online transform the layers read), so calibration
captures the rotated inputs and the QUBO rounds the rotated weights with no other change. The
online transforms' MatMuls are not layers to quantize (``passes.online_rotations`` names them).
While a run uses it (``rotated``), the rotated model keeps its weights in a temporary data file:
its sessions map them instead of holding another copy of every weight beside the float model's.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import onnx

from ..core import external
from ..core.determinism import one_blas_thread
from ..core.errors import OptionError
from ..core.options import Rotation
from ..passes import RotateInputs
from .lowering import run_passes


def rotate(model: onnx.ModelProto, rotation: Rotation, block: int, seed: int,
           convs: bool = False, residual: bool = False) -> onnx.ModelProto:
    """``model`` with its layers' inputs rotated (itself with ``Rotation.NONE``), Conv layers' input
    channels too with ``convs``, a residual stream between RMS norms as one with ``residual``; same
    outputs."""
    if rotation == Rotation.NONE:
        return model
    layer = half_precision_layer(model, convs)
    if layer is not None:
        raise OptionError(f"{{rotate}} {rotation} rotates FLOAT weights only; layer '{layer}' has FLOAT16 weights "
                          "(a half-precision model): use {rotate} none", "rotate")
    whole = rotation == Rotation.WHOLE
    with one_blas_thread():  # the rotated weights are what the codes round: the same bits whatever the threads
        return run_passes(model, [RotateInputs(seed, block, external.read_array, whole, convs, residual)]).model


def half_precision_layer(model: onnx.ModelProto, convs: bool = False) -> str | None:
    """The first MatMul/Gemm (Conv too with ``convs``) with FLOAT16 weights (which the rotation does
    not take), else None."""
    half = {init.name for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT16}
    kinds = ("MatMul", "Gemm", "Conv") if convs else ("MatMul", "Gemm")
    return next((node.name for node in model.graph.node
                 if node.op_type in kinds and len(node.input) > 1 and node.input[1] in half), None)


NORMALIZATIONS = frozenset({"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                            "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})
AFFINE_STEPS = 2  # a decomposed norm's gain (Mul) and shift (Add) after its division


def normalized_layer(model: onnx.ModelProto) -> str | None:
    """The first MatMul/Gemm with a constant weight that reads a normalization's output (a
    transformer's LayerNorm or RMSNorm: the ops, onnxruntime's fused ones included, or the
    elementwise chain older exporters write: ``normalized_outputs``), else None. Their
    per-channel gains give such inputs the outlier channels a rotation spreads out."""
    constant = {init.name for init in model.graph.initializer}
    normalized = normalized_outputs(model.graph)
    return next((node.name or node.output[0] for node in model.graph.node
                 if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1
                 and node.input[0] in normalized and node.input[1] in constant), None)


def normalized_outputs(graph: onnx.GraphProto) -> set[str]:
    """Tensors that are a normalization's output: a normalization op's, or a decomposed one's (as
    torch.onnx.export writes LayerNorm below opset 17 and RMSNorm below 23): ``x / Sqrt(m)`` or
    ``x * Reciprocal(Sqrt(m))`` (or ``x * (1 / Sqrt(m))``, the TorchScript exporter's rsqrt) with
    ``m`` a ReduceMean (plus epsilon), then at most a constant gain and shift (Mul and Add)."""
    nodes = list(graph.node)
    producer = {out: node for node in nodes for out in node.output}
    constants = {init.name for init in graph.initializer} | {
        out for node in nodes if node.op_type == "Constant" for out in node.output}

    def made_by(name: str, op: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    def root_mean(name: str) -> bool:  # Sqrt(ReduceMean(..) [+ eps])
        root = made_by(name, "Sqrt")
        if root is None or not root.input:
            return False
        shifted = made_by(root.input[0], "Add")
        return any(made_by(t, "ReduceMean") for t in (shifted.input if shifted is not None else root.input))

    def inverse_root_mean(name: str) -> bool:  # Reciprocal(root) or constant / root
        inverse = made_by(name, "Reciprocal")
        if inverse is not None:
            return root_mean(inverse.input[0])
        quotient = made_by(name, "Div")
        return quotient is not None and quotient.input[0] in constants and root_mean(quotient.input[1])

    def divided(node: onnx.NodeProto) -> bool:
        if node.op_type == "Div" and len(node.input) == 2:  # x / root, not 1 / root
            return node.input[0] not in constants and root_mean(node.input[1])
        return node.op_type == "Mul" and any(inverse_root_mean(t) for t in node.input)

    normalized = {node.output[0] for node in nodes if node.output and
                  (node.op_type in NORMALIZATIONS or divided(node))}
    for _ in range(AFFINE_STEPS):
        normalized |= {node.output[0] for node in nodes if node.op_type in ("Mul", "Add") and len(node.input) == 2
                       and any(t in normalized for t in node.input) and any(t in constants for t in node.input)}
    return normalized


@contextmanager
def rotated(model: onnx.ModelProto, rotation: Rotation, block: int, seed: int,
            convs: bool = False, residual: bool = False) -> Iterator[onnx.ModelProto]:
    """``rotate``'s model, its weights spilled to a temporary folder (``tempfile``'s: ``TMPDIR``)
    removed when the block ends: what is kept from it (a quantized model's float tensors) must be
    materialized inside the block."""
    turned = rotate(model, rotation, block, seed, convs, residual)
    if turned is model:
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="onnx-qubo-rotated-") as folder:
        external.spill(turned, Path(folder))
        yield turned
