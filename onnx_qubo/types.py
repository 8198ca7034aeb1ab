"""Small data types passed between the stages of the pipeline (plain data, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grid import GroupScales, InputQuantizer, Scheme


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """One dense layer found in the graph: ``y = gain * weight @ x (+ bias)``.

    ``weight`` is the float initializer in canonical [n_out, f_in] orientation, whatever
    layout the node stores it in; ``gain`` is Gemm's ``alpha`` (1 for MatMul). ``bias`` is the
    effective bias (Gemm's beta * C, or the constant of a following Add) when it is a
    per-output vector held by an initializer only this layer reads, so that it can be
    quantized (``bias_name``); otherwise None, and any bias stays as it is.
    """

    name: str  # the node's name (made unique by discovery when the model has none)
    op_type: str  # "Gemm" or "MatMul"
    form: str  # human-readable pattern, e.g. "Gemm(transB=1)", "MatMul+Add", "MatMul (N-D)"
    input_name: str  # activation tensor feeding the layer
    input_rank: int | None  # its rank when shape inference knows it
    weight_name: str  # initializer holding the weight
    weight: np.ndarray  # [n_out, f_in], float64
    gain: float
    bias: np.ndarray | None = None  # [n_out], float64
    bias_name: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape


@dataclass(frozen=True)
class SkippedNode:
    """A Gemm/MatMul that is not quantized, and why."""

    name: str
    op_type: str
    reason: str


@dataclass(frozen=True, eq=False)
class QuantizedBias:
    """A bias stored as integers: ``(integers - zero_point) * scale``."""

    integers: np.ndarray  # int64 [n_out]
    scale: np.ndarray  # () for one scale, or [n_out]
    zero_point: int
    storage: int  # ONNX integer type


@dataclass(frozen=True, eq=False)
class QuantizedLayer:
    """The result for one layer, ready for the graph rewrite: integer weights [n_out, f_in]
    with their scales and zero points (dequantized: ``scales.dequantize(integers)``, in the
    layer's stored units; Gemm's alpha still applies on top), and optionally a quantized
    bias, the quantization of its input, and a float shift of its output."""

    layer: DenseLayer
    scheme: Scheme
    integers: np.ndarray  # int64 [n_out, f_in], on scheme.grid
    scales: GroupScales
    bias: QuantizedBias | None = None
    input_quantizer: InputQuantizer | None = None
    bias_shift: np.ndarray | None = None  # [n_out] added to the layer's output (bias correction)
