"""Conv layers as dense layers over im2col patches, and their streamed Gram matrices.

An ONNX ``Conv`` with weight ``W [M, C/groups, k1..kd]`` computes, at every output position of
every sample, ``y[m] = W[m] . p + b[m]`` where ``p`` is the patch of group ``g = m // (M/groups)``:
the ``f = C/groups * k1*..*kd`` input values under the (strided, dilated, zero-padded) kernel,
ordered like ``W[m].ravel()`` (channel, then kernel offsets row-major). A Conv is thus one dense
layer per group whose input vectors are the patches, one per output position, and the rounding
QUBO of qubo.py applies unchanged with ``G_g = E[z z^T]``, ``z = [p; 1]``, the mean taken over
every output position of every sample (rows = batch x output positions): the QUBO energy is then
the Conv's squared output error summed over channels and averaged over output positions, the
dense case's "mean over input vectors" with one input vector per position.

Pure numpy. ``PatchGram`` never holds more than one chunk of patches (at most ``max_bytes``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product

import numpy as np

from ..core.types import InputStatistics
from ..core.views import ConvGeometry
from .spread import SampleSpread

CHUNK_BYTES = 64 * 2 ** 20  # patches held at once by PatchGram (float64)


def flatten_weight(weight: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """ONNX weight ``[M, C/groups, k1..kd]`` -> ``[M, f]``, each row dotted with its group's
    patch rows; also flattens anything laid out like the weight (e.g. a scale broadcast to the
    weight's shape, giving a step per variable)."""
    expected = (geometry.out_channels, geometry.in_channels // geometry.groups, *geometry.kernel)
    if weight.shape != expected:
        raise ValueError(f"weight shape {weight.shape} differs from the geometry's {expected}")
    return weight.reshape(geometry.out_channels, geometry.features)


def unflatten_weight(flat: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """``[M, f]`` (e.g. integer codes) -> ONNX layout ``[M, C/groups, k1..kd]``."""
    if flat.shape != (geometry.out_channels, geometry.features):
        raise ValueError(f"flat weight shape {flat.shape} is not [{geometry.out_channels}, {geometry.features}]")
    return flat.reshape(geometry.out_channels, geometry.in_channels // geometry.groups, *geometry.kernel)


def iter_patches(x: np.ndarray, geometry: ConvGeometry, max_bytes: float = np.inf) -> Iterator[np.ndarray]:
    """The patches of ``x [B, C, *spatial]`` as float64 blocks ``[groups, rows, f]``, each at most
    ``max_bytes`` (by samples, then by ranges of the first output axis, at least one output
    line per block; besides a block, only the padded float64 copy of its samples is held);
    concatenated along axis 1 they are ``patches(x, geometry)``."""
    problem = geometry.input_problem(x.shape)
    if problem is not None:
        raise ValueError(problem)
    spatial = tuple(x.shape[2:])
    out = geometry.output_shape(spatial)
    begin, end = geometry.padding(spatial)
    row_bytes = 8 * geometry.groups * geometry.features
    per_sample = int(np.prod(out))
    samples = int(max(1, min(len(x), max_bytes // (row_bytes * per_sample))))
    lines = out[0] if samples > 1 else int(max(1, min(out[0], max_bytes // (row_bytes * per_sample // out[0]))))
    for start in range(0, len(x), samples):
        padded = np.pad(x[start:start + samples].astype(np.float64),
                        [(0, 0), (0, 0)] + list(zip(begin, end)))
        for first in range(0, out[0], lines):
            yield _patch_block(padded, geometry, out, first, min(out[0], first + lines))


def patches(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """im2col of ``x [B, C, *spatial]``: ``[groups, B * prod(out spatial), f]``, rows ordered
    (sample, output position row-major), so that for channel m of group g,
    ``patches[g] @ flat_weight[m]`` is the Conv output ``y[:, m]`` (without bias) flattened."""
    return np.concatenate(list(iter_patches(x, geometry)), axis=1)


def _patch_block(padded: np.ndarray, geometry: ConvGeometry, out: tuple[int, ...], first: int,
                 stop: int) -> np.ndarray:
    """Patches of already padded samples for output lines ``first:stop`` of the first axis."""
    b, d = len(padded), len(out)
    span = (stop - first,) + out[1:]
    starts = (first,) + (0,) * (d - 1)
    c_group = geometry.in_channels // geometry.groups
    offsets = list(product(*(range(k) for k in geometry.kernel)))  # the weight's row-major order
    block = np.empty((geometry.groups, b, *span, c_group, len(offsets)))  # the only allocation
    for t, offset in enumerate(offsets):
        index = tuple(slice(o * dil + s0 * s, o * dil + (s0 + n - 1) * s + 1, s)
                      for o, dil, s, s0, n in zip(offset, geometry.dilations, geometry.strides, starts, span))
        tap = padded[(slice(None), slice(None)) + index].reshape(b, geometry.groups, c_group, *span)
        block[..., t] = np.moveaxis(tap, (1, 2), (0, -1))  # [groups, b, *span, C/g]
    return block.reshape(geometry.groups, -1, geometry.features)


@dataclass(frozen=True, eq=False)
class ConvStatistics:
    """Second moments of a Conv's patches, per group, bias column appended (z = [p; 1]),
    averaged over every output position of every sample (``count`` of them)."""

    gram: np.ndarray  # [groups, f+1, f+1] = E[z z^T], z = [p~; 1]
    count: int  # output positions seen (samples x output positions)
    cross: np.ndarray | None = None  # [groups, f+1, f] = E[z d^T], d = p - p~
    drift: np.ndarray | None = None  # [groups, f, f] = E[d d^T]
    spread: np.ndarray | None = None  # [groups], the images' spread (spread.py; None: not measured)

    def group(self, g: int) -> InputStatistics:
        """Group g's statistics as a dense layer's (calibration.InputStatistics)."""
        spread = None if self.spread is None else float(self.spread[g])
        return InputStatistics(self.gram[g], self.count, None if self.cross is None else self.cross[g],
                               None if self.drift is None else self.drift[g], spread)


class PatchGram:
    """Streams batches of a Conv's input and accumulates, per group, ``sum z z^T`` over all
    patch rows in float64 (and ``sum z d^T``, ``sum d d^T`` with ``with_drift``): memory
    O(groups f^2) plus one chunk of patches; time O(rows f^2) per batch."""

    def __init__(self, geometry: ConvGeometry, with_drift: bool = False, spread: bool = False,
                 max_bytes: float = CHUNK_BYTES):
        f, g = geometry.features, geometry.groups
        self.geometry = geometry
        self.max_bytes = max_bytes
        self._zz = np.zeros((g, f + 1, f + 1))
        self._zd = np.zeros((g, f + 1, f)) if with_drift else None
        self._dd = np.zeros((g, f, f)) if with_drift else None
        self.count = 0
        self.spread = SampleSpread(f, g) if spread else None  # the images' spread (--damping auto only)

    def update(self, x: np.ndarray, seen: np.ndarray | None = None) -> None:
        """Add a batch ``x [B, C, *spatial]`` of the float model's Conv input (one image at a time
        where the spread is measured: each is one of its samples); ``seen``: what the quantized
        layer sees instead (only with ``with_drift``, where it is required)."""
        if (seen is None) != (self._zd is None):
            raise ValueError("'seen' inputs go with with_drift=True, and are required there")
        if not np.isfinite(x).all() or (seen is not None and not np.isfinite(seen).all()):
            raise ValueError("the Conv input holds NaN or Inf")
        if seen is not None and seen.shape != x.shape:
            raise ValueError(f"'seen' shape {seen.shape} differs from the input's {x.shape}")
        if self.spread is None:
            self._add(x, seen)
            return
        for image in range(x.shape[0]):
            self.spread.add(self._add(x[image:image + 1], None if seen is None else seen[image:image + 1]))

    def _add(self, x: np.ndarray, seen: np.ndarray | None) -> np.ndarray:
        """Add the patches of ``x`` (and ``seen``); their Gram matrices ``[groups, f, f]``."""
        streams = [iter_patches(x, self.geometry, self.max_bytes)]
        if seen is not None:
            streams.append(iter_patches(seen, self.geometry, self.max_bytes))
        f = self.geometry.features
        image = np.zeros((self.geometry.groups, f, f))
        for blocks in zip(*streams):
            p = blocks[-1]
            sums = p.sum(axis=1)  # [g, f]
            image += np.matmul(p.transpose(0, 2, 1), p)
            self._zz[:, :-1, -1] += sums
            self._zz[:, -1, :-1] += sums
            self._zz[:, -1, -1] += p.shape[1]
            if self._zd is not None and self._dd is not None:
                d = blocks[0] - p
                self._zd[:, :-1] += np.matmul(p.transpose(0, 2, 1), d)
                self._zd[:, -1] += d.sum(axis=1)
                self._dd += np.matmul(d.transpose(0, 2, 1), d)
            self.count += p.shape[1]
        self._zz[:, :-1, :-1] += image
        return image

    def result(self) -> ConvStatistics:
        """The means over all output positions seen so far."""
        if not self.count:
            raise ValueError("no Conv input was accumulated")
        n = self.count
        return ConvStatistics(self._zz / n, n, None if self._zd is None else self._zd / n,
                              None if self._dd is None else self._dd / n,
                              None if self.spread is None else self.spread.spread())
