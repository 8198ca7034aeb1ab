"""Running sums of an input view's vectors over the calibration batches (the ``Accumulator``s
that forms/ views make): ``sum z z^T`` with ``z = [x; 1]`` in float64 and, when the layer sees
other inputs than the float model's, ``sum z d^T`` and ``sum d d^T`` (``d = x - x~``); their
means are the ``InputStatistics`` the QUBO is built from.

- ``DenseGram``: vectors along the last axis (the dense forms), ``sum z z^T`` held as its upper
  triangle (``UpperTriangle``: half the memory; a language model's 120 views hold 0.4 GB instead
  of 0.8) and unpacked for one layer at a time;
- ``ConvGram``: a Conv's im2col patches, one Gram matrix per group (patches.PatchGram);
- ``RecurrentGram``: a recurrent node's gate inputs, one Gram matrix per direction.

With ``spread`` (``--damping auto`` only: a language model's calibration takes 1.74x as long
with it, benchmarks/results/spread_cost.md), each also measures how much its Gram matrix varies
from sample to sample (spread.SampleSpread): a dense view's rows split evenly into the batch's
samples (a Conv's patches are counted per image).

A dense view whose vectors are positions leaves out the padded ones when the calibration data
marks them (padding.py): masked rows are zero rows of ``z``, constant included.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..core.errors import ModelError
from ..core.types import InputStatistics
from ..core.views import ConvGeometry
from .patches import ConvStatistics, PatchGram
from .spread import SampleSpread


class UpperTriangle:
    """A symmetric m x m running sum held as its upper triangle, row after row. Each added matrix
    is exactly symmetric (numpy computes ``z.T @ z`` with BLAS's syrk and mirrors it), so the
    unpacked sum has the same bits as a full one."""

    def __init__(self, m: int):
        self.m = m
        self.values = np.zeros(m * (m + 1) // 2)

    def _rows(self) -> Iterator[tuple[int, slice]]:
        start = 0
        for i in range(self.m):
            yield i, slice(start, start + self.m - i)
            start += self.m - i

    def add(self, full: np.ndarray) -> None:
        for i, row in self._rows():
            self.values[row] += full[i, i:]

    def unpack(self) -> np.ndarray:
        full = np.empty((self.m, self.m))
        for i, row in self._rows():
            full[i, i:] = self.values[row]
            full[i:, i] = self.values[row]
        return full


class DenseGram:
    """Running sums over input vectors f wide (the last axis): ``sum z z^T`` (its upper triangle)
    and, when the layer sees other inputs than the float model's, ``sum z d^T``, ``sum d d^T``;
    with ``spread``, the samples' spread."""

    def __init__(self, f: int, with_drift: bool, spread: bool = False):
        self.f = f
        self.zz = UpperTriangle(f + 1)
        self.zd = np.zeros((f + 1, f)) if with_drift else None
        self.dd = np.zeros((f, f)) if with_drift else None
        self.count = 0
        self.averaged = False
        self.spread = SampleSpread(f) if spread else None

    def update(self, x: np.ndarray, seen: np.ndarray | None = None, samples: int = 1,
               mask: np.ndarray | None = None) -> None:
        """Add the vectors of ``samples`` calibration samples (its rows split evenly between
        them, in order; all one sample's where they do not split evenly); ``mask`` (x's leading
        shape): the rows at 0 are left out, as zero rows of ``z`` (the constant included) that
        add nothing to any sum or spread, and are not counted."""
        if mask is not None and mask.shape != x.shape[:-1]:
            raise ValueError(f"a mask of shape {list(mask.shape)} does not cover vectors of shape {list(x.shape)}")
        x = x.reshape(-1, self.f).astype(np.float64)
        x_seen = x if seen is None else seen.reshape(-1, self.f).astype(np.float64)
        kept = np.ones((len(x), 1)) if mask is None else (mask.reshape(-1, 1) != 0).astype(np.float64)
        if mask is not None:  # x_seen is x itself without ``seen``: multiplied once
            x = x * kept
            x_seen = x if seen is None else x_seen * kept
        z = np.hstack([x_seen, kept])
        self.zz.add(z.T @ z)  # exactly symmetric (BLAS's syrk)
        if self.spread is not None:
            self.spread.add_rows(x_seen.reshape(samples if samples > 1 and len(x) % samples == 0 else 1, -1, self.f))
        if self.zd is not None and self.dd is not None:
            d = x - x_seen
            self.zd += z.T @ d
            self.dd += d.T @ d
        self.count += len(x) if mask is None else int(np.count_nonzero(kept))

    def statistics(self, group: int | None = None) -> InputStatistics:
        """The means (divided once, in place: the sums are not held twice), the Gram matrix
        unpacked anew on each call: the caller holds it while it prepares one layer."""
        if not self.averaged:
            n = max(self.count, 1)  # count 0: a layer that never ran (the pipeline skips it)
            for total in (self.zz.values, self.zd, self.dd):
                if total is not None:
                    total /= n
            self.averaged = True
        spread = None if self.spread is None else float(self.spread.spread()[0])
        return InputStatistics(self.zz.unpack(), self.count, self.zd, self.dd, spread)


class ConvGram:
    """The same over a Conv's patches (patches.py), per group; ``name``: the Conv's, for errors."""

    def __init__(self, geometry: ConvGeometry, with_drift: bool, name: str, spread: bool = False):
        self.gram = PatchGram(geometry, with_drift, spread)
        self.name = name
        self.result: ConvStatistics | None = None  # the means, computed once for all groups

    def update(self, x: np.ndarray, seen: np.ndarray | None = None, samples: int = 1,
               mask: np.ndarray | None = None) -> None:
        """Add a batch (its images are the samples); a ModelError naming the Conv when its input
        does not fit it (a group that does not divide the channels, a kernel larger than the
        input), as onnxruntime would. No ``mask``: patches are not positions (Patches.positions)."""
        if mask is not None:
            raise ValueError("a Conv's patches take no padding mask")
        if x.size:  # empty: the If branch holding the Conv did not run on this batch
            problem = self.gram.geometry.input_problem(x.shape)
            if problem is not None:
                raise ModelError(f"Conv '{self.name}' cannot run on its input: {problem}")
            self.gram.update(x, seen)

    def statistics(self, group: int | None = None) -> InputStatistics:
        if not self.gram.count:  # never ran (the pipeline skips it)
            return DenseGram(self.gram.geometry.features, False, self.gram.spread is not None).statistics()
        if self.result is None:
            self.result = self.gram.result()
        return self.result.group(group or 0)


class RecurrentGram:
    """The same over a recurrent node's gate inputs ``[x_t; h_(t-1)]`` (forms/recurrent.py), one
    Gram matrix per direction (each has its own hidden states)."""

    def __init__(self, f: int, directions: int, with_drift: bool, spread: bool = False):
        self.grams = [DenseGram(f, with_drift, spread) for _ in range(directions)]

    def update(self, x: np.ndarray, seen: np.ndarray | None = None, samples: int = 1,
               mask: np.ndarray | None = None) -> None:
        if mask is not None:
            raise ValueError("a recurrent node's gate inputs take no padding mask")
        for d, gram in enumerate(self.grams):  # x, seen: [directions, rows, f]
            gram.update(x[d], None if seen is None else seen[d], samples)

    def statistics(self, group: int | None = None) -> InputStatistics:
        return self.grams[group or 0].statistics()
