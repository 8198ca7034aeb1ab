"""Integer grids and quantization schemes: bit widths, zero points, scale groups, their ONNX
storage types, and the floor/clamp bookkeeping of a rounding."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from onnx import TensorProto

from .choice import Choice

MIN_BITS, MAX_BITS = 1, 8
SCALE_DTYPES: dict[int, type[np.floating]] = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
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
    """How one layer's weights are quantized: bit width, zero point, which weights share a scale
    (``channel``: each output row; ``tensor``: all; ``block``: runs of ``block_size`` inputs
    within a row), and the float type the scales are stored in (the weight's own: FLOAT, or
    FLOAT16 for a half-precision model, whose DequantizeLinear and kernels then compute in it).
    ``float_zero_point`` (asymmetric only): zero points are any real number, stored in the scale
    type, as MatMulNBits takes them: each group is ``scale * q + offset`` (GGUF's Q4_1 and HQQ)."""

    bits: int = 2
    granularity: Granularity = Granularity.CHANNEL
    block_size: int = 0  # only for granularity block
    symmetric: bool = True
    scale_type: int = TensorProto.FLOAT
    float_zero_point: bool = False

    def __post_init__(self) -> None:
        IntegerGrid(self.bits)  # validates bits
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        if (self.granularity == Granularity.BLOCK) != (self.block_size > 0):
            raise ValueError("a block size (>= 1) goes with granularity 'block', and only with it")
        if self.float_zero_point and self.symmetric:
            raise ValueError("float zero points go with the asymmetric grid")
        if self.scale_type not in SCALE_DTYPES:
            raise ValueError(f"scales are stored as FLOAT or FLOAT16, not {TensorProto.DataType.Name(self.scale_type)}")

    @property
    def scale_dtype(self) -> type[np.floating]:
        """The numpy type of the stored scales (and of what they dequantize to)."""
        return SCALE_DTYPES[self.scale_type]

    def stored(self, scale: np.ndarray) -> np.ndarray:
        """Scales [float64] as they will be read back from the file, so that the QUBO solves for
        the model that is written. FLOAT16 scales are rounded (and kept above zero: its smallest
        subnormal); FLOAT ones are left in float64, whose rounding to float32 on writing moves a
        weight by at most 2^-24 of itself."""
        if self.scale_type == TensorProto.FLOAT:
            return scale
        tiny = float(np.finfo(np.float16).smallest_subnormal)
        return np.maximum(scale, tiny).astype(np.float16).astype(np.float64)

    def stored_zero_point(self, zero_point: np.ndarray) -> np.ndarray:
        """Float zero points [float64] as they will be read back from the file (``stored``'s
        rounding, without its floor: a zero point may be zero or negative)."""
        return zero_point if self.scale_type == TensorProto.FLOAT else zero_point.astype(np.float16).astype(np.float64)

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
    dequantized weight ``w = scale * (q - zero_point)`` (``WeightCodes.dequantize``)."""

    scale: np.ndarray  # float64 [n, g], positive
    zero_point: np.ndarray  # int64 [n, g], on the grid; float64 on a float zero-point grid
    width: int  # input columns per group

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    def per_column(self, values: np.ndarray, f: int) -> np.ndarray:
        """Group values [n, g] for each of f input columns: [n, f], or [n, 1] (broadcastable)
        when a row has one group."""
        return values if self.groups == 1 else np.repeat(values, self.width, axis=1)[:, :f]

    def rows(self, rows: slice) -> GroupScales:
        """The scales of some rows (a pass over a large weight in runs of rows)."""
        return GroupScales(self.scale[rows], self.zero_point[rows], self.width)


@dataclass(frozen=True, eq=False)
class WeightCodes:
    """A weight [n, f] as integer codes on ``scheme``'s grid with their scales: the one record of
    weight codes (a layer's, a table's, what every backend writes), ``w = scale * (q - zero_point)``.

    The kernels' view of the scales: ``scale``/``zero_point`` are [n] with one group per row (per
    channel or per tensor, or one block spanning the row) and [n, g] with blocks of ``block_size``
    inputs (the last block of a row may be shorter); ``zero_point`` is None on the signed grid.
    """

    integers: np.ndarray  # [n, f], in the smallest integer type that holds the grid (layer.compact)
    scales: GroupScales  # [n, g]
    scheme: Scheme

    def __post_init__(self) -> None:
        n, f = self.integers.shape
        groups = -(-f // self.scales.width)
        for name, values in (("scale", self.scales.scale), ("zero_point", self.scales.zero_point)):
            if values.shape != (n, groups):
                raise ValueError(f"{name} shape {values.shape} does not fit weights {n}x{f} in groups of "
                                 f"{self.scales.width} ({(n, groups)})")
        grid = self.scheme.grid
        checked = [("integers", self.integers)]
        if not self.scheme.float_zero_point:
            checked.append(("zero_point", self.scales.zero_point))
        for name, values in checked:
            if values.size and (values.min() < grid.qmin or values.max() > grid.qmax):
                raise ValueError(f"{name} outside the {self.bits}-bit grid [{grid.qmin}, {grid.qmax}]")

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def signed(self) -> bool:
        return self.scheme.symmetric

    @property
    def block_size(self) -> int:
        """Inputs per scale block, 0 when each row has one scale."""
        return self.scales.width if self.scales.groups > 1 else 0

    @property
    def scale(self) -> np.ndarray:
        return self.scales.scale if self.block_size else self.scales.scale[:, 0]

    @property
    def zero_point(self) -> np.ndarray | None:
        if self.signed:
            return None
        return self.scales.zero_point if self.block_size else self.scales.zero_point[:, 0]

    def scaled(self, factor: float) -> "WeightCodes":
        """The same codes with every scale times ``factor`` (Gemm's alpha folded in)."""
        scales = GroupScales(self.scales.scale * factor, self.scales.zero_point, self.scales.width)
        return WeightCodes(self.integers, scales, self.scheme)

    def unsigned(self) -> "WeightCodes":
        """The same weights on the unsigned grid: codes and zero points moved up by ``2^(B-1)``
        (so that row runs that chose different grids can be stored as one)."""
        if not self.signed:
            return self
        shift = 2 ** (self.bits - 1)
        scales = GroupScales(self.scales.scale, self.scales.zero_point + shift, self.scales.width)
        codes = (self.integers.astype(np.int16) + shift).astype(np.uint8)  # at most 8 bits
        return WeightCodes(codes, scales, replace(self.scheme, symmetric=False))

    def dequantize(self) -> np.ndarray:
        """The float weights [n, f] the codes stand for, float64."""
        f = self.integers.shape[1]
        scales = self.scales
        return scales.per_column(scales.scale, f) * (self.integers - scales.per_column(scales.zero_point, f))


@dataclass(frozen=True, eq=False)
class Rounding:
    """Where each weight sits on the grid, as binary variables: ``w / s + zero_point = base + frac``.

    With two levels (``digits == (1,)``) each weight is one variable: ``free`` weights may
    round to ``base`` or ``base + 1``; the others are clamped to ``base`` (their floor or
    ceiling leaves the grid), and ``frac`` then holds their clamping residual, which still
    counts in the error. With more levels (``split_levels``) weight j is the D = len(digits)
    consecutive variables j*D .. j*D+D-1 (most significant first); variable c adds
    ``digits[c]`` grid steps when set, its ``frac`` is in units of its own ``digits[c]`` steps,
    and ``base`` is zero but on the last variable, so a weight's code is the sum over its
    variables of ``base + digits * v``.
    """

    base: np.ndarray  # int16 [n, m * D] (a grid of at most 8 bits: an LM head's is 56 MB, not 226)
    frac: np.ndarray  # float64 [n, m * D]
    free: np.ndarray  # bool [n, m * D]
    digits: tuple[int, ...] = (1,)

    def integers(self, choice: np.ndarray) -> np.ndarray:
        """The grid codes [n, m] of a choice (bool [n, m * D]; ignored where not free)."""
        digits = np.asarray(self.digits, dtype=np.int64)
        codes = self.base + np.tile(digits, self.base.shape[1] // len(digits)) * (choice & self.free)
        return codes.reshape(len(codes), -1, len(digits)).sum(axis=2)


def split_rounding(scaled: np.ndarray, grid: IntegerGrid) -> Rounding:
    """Floor every value in grid units (zero point included); clamp the ones whose choice
    would leave the grid."""
    base = np.floor(scaled)
    free = base >= grid.qmin
    free &= base <= grid.qmax - 1  # its ceiling is on the grid too
    np.clip(base, grid.qmin, grid.qmax, out=base)  # in place: one [n, m] float64 array the fewer at the peak
    return Rounding(base.astype(np.int16), scaled - base, free)


def level_digits(levels: int) -> tuple[int, ...]:
    """Step weights of the binary variables choosing among ``levels`` consecutive grid points:
    ``levels - 1`` variables of one step each (a weight's offset is how many are set). Every
    offset is reachable and none leaves the window, so the encoding is exact without a
    penalty; unlike binary digits (2, 1), every move to a neighbouring level is one flip, which
    is what the solvers' local moves need (with (2, 1), 1 -> 2 takes two flips at once)."""
    return (1,) * (levels - 1)


def split_levels(scaled: np.ndarray, grid: IntegerGrid, levels: int) -> Rounding:
    """Each value [n, m] may take any of ``levels`` consecutive grid points centred on it (the
    window slid inside the grid at its ends): ``levels - 1`` = 1 is ``split_rounding``. The
    variables' fracs put round-to-nearest at every variable's own nearest value, so rounding each
    variable alone (the rtn solver) is round-to-nearest on the grid."""
    if levels == 2:
        return split_rounding(scaled, grid)
    top = grid.qmax - (levels - 1)
    if top < grid.qmin:
        raise ValueError(f"a {grid.bits}-bit grid has fewer than {levels} levels")
    digits = level_digits(levels)
    base = np.clip(np.floor(scaled + 0.5 - (levels - 1) / 2), grid.qmin, top)
    offset = scaled - base  # in [0, levels - 1] unless clamped
    rest = np.clip(np.floor(offset + 0.5), 0, levels - 1)  # round-to-nearest's offset
    frac = np.empty(scaled.shape + (len(digits),))
    for c, digit in enumerate(digits[:-1]):  # its greedy digits; the last variable takes the remainder
        bit = rest >= digit
        frac[..., c] = bit
        rest, offset = rest - digit * bit, offset - digit * bit
    frac[..., -1] = offset / digits[-1]
    n, m = scaled.shape
    codes = np.zeros(frac.shape, dtype=np.int16)
    codes[..., -1] = base
    return Rounding(codes.reshape(n, -1), frac.reshape(n, -1), np.ones((n, m * len(digits)), dtype=bool), digits)


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
