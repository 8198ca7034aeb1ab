"""How far an input's Gram matrix would move with other calibration samples, and the damping
``--damping auto`` takes from it (Ledoit and Wolf's shrinkage intensity, per layer).

The QUBO's rounding is exact on the calibration samples' Gram matrix G, so where G is a poor
estimate (few samples for its width: a classifier head seeing one row per sample, a projection
whose inputs differ most from sample to sample) it also fits their noise. Each sample t (one
image's patches, one sequence's tokens) has its own Gram matrix G_t; scaled to trace 1 (a
sample's overall level does not change which rounding is best, only the shape of G_t does), their
spread ``sum_t ||G_t - mean||_F^2 / T^2`` estimates the squared error of the T-sample mean. Ledoit
and Wolf shrink G toward the identity (times its mean diagonal) by ``delta = spread / ||G - mean
diag I||_F^2``, both in trace-1 units: the ridge ``delta / (1 - delta)`` of the mean diagonal.

Where a bias correction follows, the objective is the Gram matrix about the inputs' means, whose
trace can be far smaller than the samples' (inputs with large means): the spread is still taken as
relative noise, not moved to that trace. Moved, it is dominated by how the samples' means differ,
noise a ridge on every direction serves badly: on the PP-OCRv4 recognizer it put ridges of 9 on
1x1 Convs after large-mean activations and doubled their held-out error (docs/results.md,
"Automatic damping").
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

MIN_SAMPLES = 2  # a spread needs two samples
MAX_SHRINKAGE = 0.9  # delta's cap: a ridge of at most 9 times the mean diagonal
SMALL_GRAMS_BYTES = 1 << 26  # add_rows: the per-sample Gram matrices (rows x rows or f x f) held at once


@lru_cache(maxsize=8)
def _upper(f: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(f)


class SampleSpread:
    """Per group of a view (one for a dense input, a Conv's groups), over the samples added so
    far: the sum of the trace-1 sample Gram matrices (upper triangles, float32: an estimate of
    noise needs no more) and of their squared Frobenius norms; a sample whose inputs are all zero
    in a group is not counted there."""

    def __init__(self, f: int, groups: int = 1):
        self.f = f
        self.samples = np.zeros(groups, dtype=np.int64)
        self.squares = np.zeros(groups)
        self.total: np.ndarray | None = np.zeros((groups, f * (f + 1) // 2), dtype=np.float32)
        self.result: np.ndarray | None = None

    def add(self, grams: np.ndarray) -> None:
        """One sample's Gram matrices ``[groups, f, f]`` (sums over its rows, at any scale)."""
        if self.total is None:
            raise ValueError("the spread was already computed: no sample can be added")
        traces = np.einsum("gii->g", grams)
        counted = traces > 0
        scale = np.where(counted, 1.0 / np.where(counted, traces, 1.0), 0.0)  # 0: a group not counted adds nothing
        self.squares += np.einsum("gij,gij->g", grams, grams) * scale ** 2
        rows, cols = _upper(self.f)
        upper = grams[:, rows, cols]  # one gather (a language model's widest view: ~1/6 of its Gram product)
        upper *= scale[:, None]
        self.total += upper
        self.samples += counted

    def add_rows(self, x: np.ndarray) -> None:
        """Samples given by their rows ``x [samples, rows, f]`` (one group), without a Gram
        matrix per sample: the trace-1 Grams sum to one product of the rows scaled by
        ``1 / sqrt(trace)`` per sample, and a sample's squared norm ``||X^T X||_F^2`` is
        ``||X X^T||_F^2``, the cheaper where it has fewer rows than features (the MNIST CNN's
        classifier sees one 1568-wide row per sample: its calibration took 13 s with a Gram matrix
        per sample, 0.7 s so)."""
        if self.total is None:
            raise ValueError("the spread was already computed: no sample can be added")
        count, rows, f = x.shape
        if not x.size:  # no rows (an If branch not taken on this batch): no sample
            return
        traces = np.einsum("trf,trf->t", x, x)
        counted = traces > 0
        scale = np.where(counted, 1.0 / np.where(counted, traces, 1.0), 0.0)
        # the products in float32 (an estimate of noise needs no more; BLAS runs them ~1.7x faster), sums in float64
        scaled = (x * np.sqrt(scale)[:, None, None]).astype(np.float32)
        chunk = max(1, SMALL_GRAMS_BYTES // (4 * min(rows, f) ** 2))  # samples whose small Grams are held at once
        for start in range(0, count, chunk):
            part = scaled[start:start + chunk]
            small = part @ part.transpose(0, 2, 1) if rows < f else part.transpose(0, 2, 1) @ part
            self.squares[0] += float(np.einsum("tij,tij->", small, small, dtype=np.float64))
        flat = scaled.reshape(-1, f)
        upper_rows, upper_cols = _upper(f)
        self.total[0] += (flat.T @ flat)[upper_rows, upper_cols]
        self.samples[0] += int(counted.sum())

    def spread(self) -> np.ndarray:
        """Per group, ``sum_t ||G_t - mean||_F^2 / T^2`` of the trace-1 sample Grams (0 under
        MIN_SAMPLES samples: no noise measured, no ridge); computed once, when the sums are freed
        (no sample is added after)."""
        if self.result is not None:
            return self.result
        if self.total is None:
            raise ValueError("no sums to measure")
        rows, cols = _upper(self.f)
        samples = np.maximum(self.samples, 1)
        mean = self.total.astype(np.float64) / samples[:, None]
        diagonal = mean[:, rows == cols]  # the triangle holds each off-diagonal entry once
        mean_square = 2 * np.einsum("gk,gk->g", mean, mean) - np.einsum("gk,gk->g", diagonal, diagonal)
        spread = np.maximum(self.squares / samples - mean_square, 0.0) / samples
        self.total = None
        self.result = np.where(self.samples >= MIN_SAMPLES, spread, 0.0)
        return self.result


def shrinkage_damping(spread: float, objective: np.ndarray) -> float:
    """The ridge, as a fraction of ``objective``'s mean diagonal, that shrinks it by Ledoit and
    Wolf's intensity: ``spread`` (the samples' relative noise: trace-1 units) over the squared
    distance of ``objective`` (the weights' block of the Gram matrix the rounding minimizes,
    centered where a bias correction follows), scaled to trace 1, from its mean diagonal times the
    identity. 0 where no spread was measured (one sample)."""
    if not np.isfinite(spread) or spread <= 0:
        return 0.0
    trace = float(np.trace(objective))
    if trace <= 0:
        return 0.0
    unit = objective / trace
    distance = float(np.einsum("ij,ij->", unit, unit)) - 1.0 / len(unit)  # ||unit - I/f||_F^2
    delta = MAX_SHRINKAGE if distance <= 0 else min(MAX_SHRINKAGE, spread / distance)
    return delta / (1.0 - delta)
