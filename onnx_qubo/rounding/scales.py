"""Choose scales and zero points: the weights' range per group, or a clipping ratio searched on
the layer's QUBO cost.

At 2 bits a range-filling scale leaves most weights at zero; shrinking a group's range
(clipping its largest weights) trades a few large errors for many small ones. The QUBO cost
under round-to-nearest is exactly the output error that trade causes, so it is the search
criterion (``mse``); ``qubo`` re-ranks the best few ratios by the cost after the fast solver
(pipeline.py). Block groups are searched on their diagonal block of the Gram matrix (the
coupling between blocks is left to the solver); a tensor's one ratio on the whole layer.
"""

from __future__ import annotations

import numpy as np

from ..core.determinism import map_threads
from ..core.grid import Granularity, GroupScales, IntegerGrid, Scheme

SCALE_METHODS = ("mse", "minmax", "qubo", "fit")
COARSE_RATIOS = np.linspace(0.05, 1.0, 10)
FINE_STEPS = np.array([-0.06, -0.04, -0.02, 0.02, 0.04, 0.06])
QUBO_CANDIDATES = 4  # ratios per group that ``--scale qubo`` solves
EXACT_WORK = 1 << 35  # multiply-adds of exact costs for all candidates, above which a sketch ranks them
SKETCH_RANK = 256  # rank of the sketch of G
CONFIRMED = 3  # candidates per group that the sketch shortlists for their exact cost
COST_ROWS = 4096  # rows per product in rounding_cost (its memory: two [COST_ROWS, f] float64 arrays)


def choose_scales(method: str, weight: np.ndarray, scheme: Scheme, gram: np.ndarray,
                  cross: np.ndarray | None = None) -> GroupScales:
    """Scales for ``weight`` [n, f]: range-filling (``minmax``) or the clipping ratio with the
    least round-to-nearest cost (``mse``; ``qubo`` starts from the same ranking).
    ``gram`` [f, f] and ``cross`` [n, f] define the cost ``d G d + 2 d . cross`` of a
    weight error d (pipeline.py: ``cross`` carries the effect of quantized inputs)."""
    if method not in SCALE_METHODS:
        raise ValueError(f"unknown scale method '{method}'; choose one of {', '.join(SCALE_METHODS)}")
    if method == "minmax":
        ranges = GroupRanges(weight, scheme)
        return ranges.scales(np.ones(ranges.shape))
    return candidate_scales(weight, scheme, gram, cross, 1)[0]


def rounding_cost(weight: np.ndarray, scales: GroupScales, scheme: Scheme, gram: np.ndarray,
                  cross: np.ndarray | None = None) -> float:
    """The round-to-nearest cost ``sum_i d_i G d_i + 2 d_i . cross_i`` of ``weight`` [n, f] on
    ``scales``, with the whole Gram matrix (the coupling between blocks included), in float64
    and in fixed runs of rows: what decides between the symmetric and asymmetric grids."""
    total = 0.0
    for rows in row_runs(len(weight), COST_ROWS):
        delta = nearest_errors(weight[rows], scales.rows(rows), scheme.grid)
        total += float(np.einsum("if,if->", delta @ gram, delta))
        if cross is not None:
            total += 2.0 * float(np.einsum("if,if->", delta, cross[rows]))
    return total


def row_runs(count: int, size: int) -> list[slice]:
    """``count`` rows in runs of ``size`` (the last one shorter): passes whose [rows, f] float64
    temporaries stay bounded, always cut at the same rows whatever the thread count."""
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def nearest_errors(weight: np.ndarray, scales: GroupScales, grid: IntegerGrid) -> np.ndarray:
    """``weight - dequantized(round to nearest)`` [n, f] on ``scales``, in ``weight``'s float
    type (the scale search ranks in float32, the grid choice adds up in float64)."""
    f = weight.shape[1]
    step = scales.per_column(scales.scale, f).astype(weight.dtype)
    scaled = weight / step
    if scales.zero_point.any():
        scaled += scales.per_column(scales.zero_point, f)
    # grid.round_nearest, in place: these [n, f] passes are most of a scale candidate's time
    nearest = np.add(scaled, 0.5)
    np.floor(nearest, out=nearest)
    np.clip(nearest, grid.qmin, grid.qmax, out=nearest)
    np.subtract(scaled, nearest, out=scaled)
    scaled *= step
    return scaled


def candidate_scales(weight: np.ndarray, scheme: Scheme, gram: np.ndarray, cross: np.ndarray | None,
                     count: int) -> list[GroupScales]:
    """The ``count`` best scale sets by round-to-nearest cost (the k-th holds every group's
    k-th best ratio): a coarse common grid of 10 ratios, then 6 finer ones around each
    group's best.

    Each candidate's exact cost is an O(n f^2) product with the Gram matrix. Past
    ``EXACT_WORK`` multiply-adds for all candidates (row or tensor scales on wide layers), the
    search ranks candidates on a sketch of G instead (``_SketchCosts``: O(n f k) each) and
    ranks the ``CONFIRMED`` best of each group again by their exact cost: that many exact
    products instead of 16."""
    ranges = GroupRanges(weight, scheme)
    exact = _RtnCosts(weight, ranges, gram, cross)
    n, f = weight.shape
    candidates = len(COARSE_RATIOS) + len(FINE_STEPS)
    sketched = ranges.width == f and candidates * n * f * f > EXACT_WORK
    costs = _SketchCosts(exact, SKETCH_RANK) if sketched else exact
    shape = ranges.shape
    coarse = np.broadcast_to(COARSE_RATIOS[:, None, None], (len(COARSE_RATIOS), *shape))
    coarse_costs = costs.of(coarse)
    best = np.take_along_axis(coarse, coarse_costs.argmin(axis=0)[None], axis=0)[0]
    fine = np.clip(best[None] + FINE_STEPS[:, None, None], 0.01, 1.0)
    ratios = np.concatenate([coarse, fine])
    order = np.argsort(np.concatenate([coarse_costs, costs.of(fine)]), axis=0, kind="stable")
    if sketched:  # the sketch's best few, ranked by their exact cost
        order = order[:max(CONFIRMED, count)]
        shortlist = np.take_along_axis(ratios, order, axis=0)
        order = np.argsort(exact.of(shortlist), axis=0, kind="stable")
        ratios = shortlist
    return [ranges.scales(r) for r in np.take_along_axis(ratios, order[:count], axis=0)]


class GroupRanges:
    """Each scale group's weight range: ``[lo, hi]`` (containing 0, so that 0 stays exact, on an
    integer zero-point grid) for asymmetric grids, ``max |w|`` for symmetric ones; a ratio in
    (0, 1] clips it (about 0 with integer zero points, about the range's middle with float ones)."""

    def __init__(self, weight: np.ndarray, scheme: Scheme):
        n, f = weight.shape
        self.scheme, self.grid, self.width = scheme, scheme.grid, scheme.group_width(f)
        self.tensor = scheme.granularity == Granularity.TENSOR
        groups = -(-f // self.width)
        padded = np.zeros((n, groups * self.width))
        padded[:, :f] = weight
        blocks = padded.reshape(n, groups, self.width)
        lo, hi = blocks.min(axis=2), blocks.max(axis=2)
        if f % self.width:  # the padding of a short last block is not a weight
            last = weight[:, (groups - 1) * self.width:]
            lo[:, -1], hi[:, -1] = last.min(axis=1), last.max(axis=1)
        if not scheme.float_zero_point:
            lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        self.lo, self.hi = lo, hi
        if scheme.granularity == Granularity.TENSOR:
            self.lo = np.full((n, 1), self.lo.min())
            self.hi = np.full((n, 1), self.hi.max())
        self.shape = self.lo.shape

    def scales(self, ratio: np.ndarray) -> GroupScales:
        grid = self.grid
        if grid.signed:  # at 1 bit the grid is {-1, 0}: the magnitude maps onto -1
            top = grid.qmax if grid.qmax > 0 else -grid.qmin
            scale = np.maximum(-self.lo, self.hi) * ratio / top
            scale = self.scheme.stored(np.where(scale > 0, scale, 1.0))
            return GroupScales(scale, np.zeros(self.shape, dtype=np.int64), self.width)
        if self.scheme.float_zero_point:
            middle, half = (self.hi + self.lo) / 2, (self.hi - self.lo) / 2 * ratio
            scale = self.scheme.stored(np.where(half > 0, 2 * half / (grid.qmax - grid.qmin), 1.0))
            zero_point = self.scheme.stored_zero_point(grid.qmin - (middle - half) / scale)
            return GroupScales(scale, zero_point, self.width)
        lo, hi = self.lo * ratio, self.hi * ratio
        scale = (hi - lo) / (grid.qmax - grid.qmin)
        scale = self.scheme.stored(np.where(scale > 0, scale, 1.0))
        zero_point = np.clip(np.round(grid.qmin - lo / scale), grid.qmin, grid.qmax).astype(np.int64)
        return GroupScales(scale, zero_point, self.width)


def fitted_scales(weight: np.ndarray, codes: np.ndarray, scales: GroupScales, scheme: Scheme,
                  gram: np.ndarray, cross: np.ndarray | None = None) -> GroupScales:
    """The scales (and, on a float zero-point grid, the zero points) that fit the rounded
    ``codes`` [n, f] best: with the codes fixed, the dequantized weight is linear in each group's
    scale s and offset t = -s * zero_point, so the cost ``d G d + 2 d . cross`` (d = weight -
    dequantized) is least squares in them, solved exactly per group on its diagonal block of G
    (a row's one group: the whole G). Integer grids keep their zero points and fit s alone; a
    float zero-point grid fits s and t together (GGUF's and HQQ's scale-and-minimum blocks, fitted
    to the layer's output instead of the weights). A group whose fit is degenerate or not
    positive keeps its scale; the fit of a tensor-wide scale adds every row's equations."""
    n, f = weight.shape
    width, groups = scales.width, scales.groups
    k = 2 if scheme.float_zero_point else 1
    normal = np.zeros((n, groups, k, k))
    target = np.zeros((n, groups, k))
    for b in range(groups):  # one block of columns at a time: [n, width] temporaries (an LM head's n is 49k)
        cols = slice(b * width, min((b + 1) * width, f))
        block = gram[cols, cols]
        pulled = weight[:, cols] @ block  # G w per row, on the block
        if cross is not None:
            pulled += cross[:, cols]
        if scheme.float_zero_point:  # w = s q + t
            units = [codes[:, cols].astype(np.float64), np.ones((n, cols.stop - cols.start))]
        else:  # w = s (q - zero_point)
            units = [codes[:, cols] - scales.zero_point[:, b:b + 1].astype(np.float64)]
        for a in range(k):
            target[:, b, a] = np.einsum("if,if->i", units[a], pulled)
            projected = units[a] @ block
            for c in range(k):
                normal[:, b, a, c] = np.einsum("if,if->i", projected, units[c])
    if scheme.granularity == Granularity.TENSOR:
        normal, target = normal.sum(axis=0, keepdims=True), target.sum(axis=0, keepdims=True)
    det = np.linalg.det(normal)
    solvable = np.abs(det) > 1e-12 * np.abs(normal).reshape(*det.shape, -1).max(axis=-1) ** k
    safe = np.where(solvable[..., None, None], normal, np.eye(k))
    theta = np.linalg.solve(safe, target[..., None])[..., 0]
    scale = theta[..., 0]
    keep = solvable & (scale > 0) & np.isfinite(theta).all(axis=-1)
    if scheme.granularity == Granularity.TENSOR:
        keep, scale, theta = (np.broadcast_to(v, (n, *v.shape[1:])) for v in (keep, scale, theta))
    new_scale = scheme.stored(np.where(keep, scale, scales.scale))
    if not scheme.float_zero_point:
        return GroupScales(new_scale, scales.zero_point, width)
    offset = np.where(keep, theta[..., 1], 0.0)
    zero_point = np.where(keep, scheme.stored_zero_point(-offset / np.where(keep, new_scale, 1.0)), scales.zero_point)
    return GroupScales(new_scale, zero_point, width)


def tensor_scales(values: np.ndarray, weights: Scheme) -> GroupScales:
    """One range-filling scale for a vector [n] (a quantized bias) on the ``weights``' grid and
    scale type, as [n, 1] groups."""
    scheme = Scheme(weights.bits, Granularity.TENSOR, symmetric=weights.symmetric, scale_type=weights.scale_type)
    ranges = GroupRanges(values[:, None], scheme)
    return ranges.scales(np.ones(ranges.shape))


class _RtnCosts:
    """Round-to-nearest cost of every group for candidate ratios, in float32: half the time of
    float64 on wide layers, and the ranking of candidates needs no more precision. (A Gemm's
    alpha scales every candidate of a row alike, so it does not enter.)"""

    def __init__(self, weight, ranges: GroupRanges, gram, cross):
        self.weight, self.ranges = weight.astype(np.float32), ranges
        self.gram = gram.astype(np.float32)
        self.cross = None if cross is None else cross.astype(np.float32)

    def of(self, ratios: np.ndarray) -> np.ndarray:
        """Costs [m, n, g] for ratios [m, n, g] (candidates on every core); a tensor-wide group
        gets the layer's total."""
        return np.stack(map_threads(self._costs, ratios))

    def deltas(self, ratio: np.ndarray) -> np.ndarray:
        """Weight errors [n, f] of round-to-nearest with the scales of ``ratio`` [n, g]."""
        return nearest_errors(self.weight, self.ranges.scales(ratio), self.ranges.grid)

    def _costs(self, ratio: np.ndarray) -> np.ndarray:
        delta = self.deltas(ratio)
        f = self.weight.shape[1]
        width = self.ranges.width
        costs = np.empty(ratio.shape)
        for b in range(ratio.shape[1]):
            cols = slice(b * width, min((b + 1) * width, f))
            d = delta[:, cols]
            costs[:, b] = np.einsum("if,if->i", d @ self.gram[cols, cols], d)
            if self.cross is not None:
                costs[:, b] += 2.0 * np.einsum("if,if->i", d, self.cross[:, cols])
        if self.ranges.tensor:  # one ratio for the layer: rank it by the layer's total
            costs[:] = costs.sum()
        return costs


class _SketchCosts:
    """Approximate round-to-nearest costs on a sketch of G: ``G ~ F F^T + diag(rest)``, F [f, k]
    spanning G's dominant range (a randomized range finder with one power iteration, seeded:
    the same layer gets the same sketch), ``rest`` the diagonal F misses. A candidate costs
    ``|d F|^2 + rest . d^2 + 2 d . cross``: O(n f k) instead of O(n f^2). The cross term is exact."""

    def __init__(self, exact: _RtnCosts, rank: int):
        self.exact = exact
        gram = exact.gram
        f = len(gram)
        k = min(rank, f)
        probe = np.random.default_rng(0).standard_normal((f, k)).astype(np.float32)
        basis = _orthonormal(gram @ _orthonormal(gram @ probe))
        values, vectors = np.linalg.eigh((basis.T @ gram @ basis).astype(np.float64))
        self.factor = (basis @ vectors.astype(np.float32)) * np.sqrt(np.maximum(values, 0.0)).astype(np.float32)
        self.rest = np.maximum(np.diag(gram) - np.einsum("fk,fk->f", self.factor, self.factor), 0.0)

    def of(self, ratios: np.ndarray) -> np.ndarray:
        """Costs [m, n, 1] for ratios [m, n, 1] (row or tensor scales; candidates on every core)."""
        return np.stack(map_threads(self._costs, ratios))

    def _costs(self, ratio: np.ndarray) -> np.ndarray:
        exact = self.exact
        d = exact.deltas(ratio)
        low = d @ self.factor
        costs = np.einsum("ik,ik->i", low, low) + (d * d) @ self.rest
        if exact.cross is not None:
            costs += 2.0 * np.einsum("if,if->i", d, exact.cross)
        costs = costs[:, None].astype(np.float64)
        if exact.ranges.tensor:
            costs[:] = costs.sum()
        return costs


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of y [f, k] (from the eigenvectors of y^T y: k^3
    work instead of a QR's f k^2 Householder steps; columns of negligible weight dropped)."""
    values, vectors = np.linalg.eigh((y.T @ y).astype(np.float64))
    keep = values > values.max() * 1e-6
    return y @ (vectors[:, keep] / np.sqrt(values[keep])).astype(y.dtype)
