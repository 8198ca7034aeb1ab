"""Integer grids: bit widths, their ONNX storage types, max-abs scales, floor/clamp bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

MIN_BITS, MAX_BITS = 1, 8


@dataclass(frozen=True)
class IntegerGrid:
    """Signed symmetric grid ``q in [-2^(B-1), 2^(B-1) - 1]``, zero point 0."""

    bits: int

    def __post_init__(self):
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def storage(self) -> tuple[int, int]:
        """(narrowest ONNX integer type holding the grid, the opset it needs for per-axis DQ)."""
        if self.bits <= 2:
            return TensorProto.INT2, 25
        if self.bits <= 4:
            return TensorProto.INT4, 21
        return TensorProto.INT8, 13

    def round_nearest(self, scaled: np.ndarray) -> np.ndarray:
        """Nearest grid integer (halves round up, like the rtn solver), clamped to the grid."""
        return np.clip(np.floor(scaled + 0.5), self.qmin, self.qmax)

    def max_abs_scale(self, weight: np.ndarray) -> np.ndarray:
        """Per-row scale mapping the row's largest magnitude onto the grid's positive end.

        At 1 bit the grid is {-1, 0}: the magnitude maps onto -1 instead.
        """
        amax = np.abs(weight).max(axis=1)
        top = self.qmax if self.qmax > 0 else -self.qmin
        return np.where(amax > 0, amax / top, 1.0)


@dataclass(frozen=True, eq=False)
class Rounding:
    """Where each weight sits on the grid: ``w / s = base + frac``.

    ``free`` weights may round to ``base`` or ``base + 1``; the others are clamped to
    ``base`` (their floor or ceiling leaves the grid), and ``frac`` then holds their
    clamping residual, which still counts in the error.
    """

    base: np.ndarray  # int64 [n, f]
    frac: np.ndarray  # float64 [n, f]
    free: np.ndarray  # bool [n, f]


def split_rounding(weight: np.ndarray, scale: np.ndarray, grid: IntegerGrid) -> Rounding:
    """Floor every weight, clamp the ones whose choice would leave the grid."""
    scaled = weight / scale[:, None]
    floor = np.floor(scaled)
    free = (floor >= grid.qmin) & (floor + 1 <= grid.qmax)
    base = np.clip(floor, grid.qmin, grid.qmax)
    return Rounding(base.astype(np.int64), scaled - base, free)
