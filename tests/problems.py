"""Layer problems for the solver and QUBO tests, built the way the pipeline builds them."""

from __future__ import annotations

import numpy as np

from onnx_qubo.core.grid import IntegerGrid, Scheme
from onnx_qubo.rounding.qubo import LayerProblem, build_problem
from onnx_qubo.rounding.scales import choose_scales


def max_abs_scale(w: np.ndarray, bits: int) -> np.ndarray:
    """Per-row symmetric range-filling scale [n]."""
    return choose_scales("minmax", w, Scheme(bits), np.eye(w.shape[1])).scale[:, 0]


def channel_problem(w: np.ndarray, scale: np.ndarray, bits: int, gram: np.ndarray, gain: float = 1.0) -> LayerProblem:
    """Symmetric per-channel QUBO for weights [n, f] with row scales [n]."""
    return build_problem(w, scale[:, None], 0, gain, IntegerGrid(bits), gram)


def random_problem(n=6, f=10, bits=2, clip=0.7, samples=200, seed=0, general=False) -> LayerProblem:
    """Random weights on correlated inputs. ``general``: every term the pipeline can produce:
    asymmetric grid, a scale per variable (blocks), a negative gain, and a cross term with an
    offset (inputs that differ from the float ones)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, f))
    x = rng.standard_normal((samples, f)) @ rng.standard_normal((f, f)) * 0.5 + 0.3  # correlated inputs
    gram = x.T @ x / samples
    if not general:
        return channel_problem(w, max_abs_scale(w, bits) * clip, bits, gram)
    grid = IntegerGrid(bits, signed=False)
    scale = np.abs(w).max(axis=1, keepdims=True) * clip * rng.uniform(0.5, 1.5, (n, f)) / grid.qmax * 2
    zero_point = rng.integers(0, grid.qmax + 1, (n, 1))
    x_seen = x + 0.05 * rng.standard_normal(x.shape)
    d = x - x_seen
    gain = -1.3
    cross = gain * w @ (x_seen.T @ d / samples).T
    offset = gain ** 2 * np.einsum("if,if->i", w @ (d.T @ d / samples), w)
    return build_problem(w, scale, zero_point, gain, grid, x_seen.T @ x_seen / samples, cross, offset)
