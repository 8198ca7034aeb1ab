"""Integer grids and quantization schemes: bit widths, zero points, scale groups, their ONNX
storage types, and the floor/clamp bookkeeping of a rounding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .choice import Choice

MIN_BITS, MAX_BITS = 1, 8
BLOCK_OPSET = 21  # DequantizeLinear's block_size attribute

_STORAGE = {  # (signed, widest bits) -> (ONNX type, opset whose per-axis DequantizeLinear takes it)
    (True, 2): (TensorProto.INT2, 25), (True, 4): (TensorProto.INT4, 21), (True, 8): (TensorProto.INT8, 13),
    (False, 2): (TensorProto.UINT2, 25), (False, 4): (TensorProto.UINT4, 21), (False, 8): (TensorProto.UINT8, 13),
}


class Granularity(Choice):
    """Which weights share one scale (and zero point)."""

    CHANNEL = "channel"  # each output row
    TENSOR = "tensor"  # the whole weight
    BLOCK = "block"  # runs of block_size inputs within a row


@dataclass(frozen=True)
class IntegerGrid:
    """``q in [qmin, qmax]``: signed ``[-2^(B-1), 2^(B-1) - 1]`` (symmetric schemes, zero point
    0) or unsigned ``[0, 2^B - 1]`` (asymmetric schemes, integer zero point)."""

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def storage(self) -> tuple[int, int]:
        """(narrowest ONNX integer type holding the grid, the opset it needs for per-axis DQ)."""
        width = 2 if self.bits <= 2 else 4 if self.bits <= 4 else 8
        return _STORAGE[self.signed, width]

    def round_nearest(self, scaled: np.ndarray) -> np.ndarray:
        """Nearest grid integer (halves round up, like the rtn solver), clamped to the grid."""
        return np.clip(np.floor(scaled + 0.5), self.qmin, self.qmax)


@dataclass(frozen=True)
class Scheme:
    """How one layer's weights are quantized: bit width, zero point, and which weights share
    a scale (``channel``: each output row; ``tensor``: all; ``block``: runs of
    ``block_size`` inputs within a row)."""

    bits: int = 2
    granularity: Granularity = Granularity.CHANNEL
    block_size: int = 0  # only for granularity block
    symmetric: bool = True

    def __post_init__(self) -> None:
        IntegerGrid(self.bits)  # validates bits
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        if (self.granularity == Granularity.BLOCK) != (self.block_size > 0):
            raise ValueError("a block size (>= 1) goes with granularity 'block', and only with it")

    @property
    def grid(self) -> IntegerGrid:
        return IntegerGrid(self.bits, signed=self.symmetric)

    @property
    def opset(self) -> int:
        storage_opset = self.grid.storage[1]
        return max(storage_opset, BLOCK_OPSET) if self.granularity == Granularity.BLOCK else storage_opset

    def group_width(self, f: int) -> int:
        """Input columns per scale group (the last block of a row may be shorter)."""
        return min(self.block_size, f) if self.granularity == Granularity.BLOCK else f


@dataclass(frozen=True, eq=False)
class GroupScales:
    """Scales and zero points of one layer, one per (row, group of ``width`` input columns):
    dequantized weight ``w = scale * (q - zero_point)``."""

    scale: np.ndarray  # float64 [n, g], positive
    zero_point: np.ndarray  # int64 [n, g], on the grid
    width: int  # input columns per group

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    def per_column(self, values: np.ndarray, f: int) -> np.ndarray:
        """Group values [n, g] for each of f input columns: [n, f], or [n, 1] (broadcastable)
        when a row has one group."""
        return values if self.groups == 1 else np.repeat(values, self.width, axis=1)[:, :f]

    def dequantize(self, integers: np.ndarray) -> np.ndarray:
        f = integers.shape[1]
        return self.per_column(self.scale, f) * (integers - self.per_column(self.zero_point, f))


@dataclass(frozen=True, eq=False)
class Rounding:
    """Where each weight sits on the grid: ``w / s + zero_point = base + frac``.

    ``free`` weights may round to ``base`` or ``base + 1``; the others are clamped to
    ``base`` (their floor or ceiling leaves the grid), and ``frac`` then holds their
    clamping residual, which still counts in the error.
    """

    base: np.ndarray  # int64 [n, m]
    frac: np.ndarray  # float64 [n, m]
    free: np.ndarray  # bool [n, m]


def split_rounding(scaled: np.ndarray, grid: IntegerGrid) -> Rounding:
    """Floor every value in grid units (zero point included); clamp the ones whose choice
    would leave the grid."""
    floor = np.floor(scaled)
    free = (floor >= grid.qmin) & (floor + 1 <= grid.qmax)
    base = np.clip(floor, grid.qmin, grid.qmax)
    return Rounding(base.astype(np.int64), scaled - base, free)


@dataclass(frozen=True)
class InputQuantizer:
    """Per-tensor 8-bit affine quantization of a layer's input (or of a Conv's output, for
    QLinearConv), as QuantizeLinear then DequantizeLinear compute it:
    ``q = clip(round_half_even(x / scale) + zero_point)``."""

    scale: float
    zero_point: int
    signed: bool  # INT8 storage, else UINT8

    @property
    def grid(self) -> IntegerGrid:
        return IntegerGrid(8, self.signed)

    @property
    def storage(self) -> int:
        return TensorProto.INT8 if self.signed else TensorProto.UINT8

    @classmethod
    def for_range(cls, lo: float, hi: float, signed: bool) -> "InputQuantizer":
        """The quantizer whose grid spans [min(lo, 0), max(hi, 0)] (0 stays exact)."""
        grid = IntegerGrid(8, signed)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = float(np.float32((hi - lo) / (grid.qmax - grid.qmin))) if hi > lo else 1.0
        zero_point = int(np.clip(np.round(grid.qmin - lo / scale), grid.qmin, grid.qmax))
        return cls(scale, zero_point, signed)

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        """What the layer sees after QuantizeLinear -> DequantizeLinear (float32 arithmetic)."""
        scale = np.float32(self.scale)
        q = np.clip(np.rint(x.astype(np.float32) / scale) + self.zero_point, self.grid.qmin, self.grid.qmax)
        return ((q - self.zero_point) * scale).astype(np.float32)
