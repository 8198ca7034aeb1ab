"""Small data types passed between the stages of the pipeline (plain data, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """One dense layer found in the graph: ``y = gain * weight @ x (+ bias)``.

    ``weight`` is the float initializer in canonical [n_out, f_in] orientation, whatever
    layout the node stores it in; ``gain`` is Gemm's ``alpha`` (1 for MatMul). The bias
    never enters the rounding objective while it stays in float, so it is not kept here.
    """

    name: str  # the node's name (made unique by discovery when the model has none)
    op_type: str  # "Gemm" or "MatMul"
    form: str  # human-readable pattern, e.g. "Gemm(transB=1)", "MatMul+Add", "MatMul (N-D)"
    input_name: str  # activation tensor feeding the layer
    input_rank: int | None  # its rank when shape inference knows it
    weight_name: str  # initializer holding the weight
    weight: np.ndarray  # [n_out, f_in], float64
    gain: float

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
class QuantizedLayer:
    """The result for one layer: integer weights [n_out, f_in] and per-channel float scales.

    Dequantized weight = ``integers * scale[:, None]`` (symmetric grid, zero point 0), in the
    layer's stored units (Gemm's alpha still applies on top).
    """

    layer: DenseLayer
    bits: int
    integers: np.ndarray  # int64 [n_out, f_in], within [qmin, qmax]
    scale: np.ndarray  # float64 [n_out]
    bias_shift: np.ndarray | None = None  # [n_out] added to the layer's output (bias correction)
