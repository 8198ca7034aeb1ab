"""Independent brute-force oracles for the solvers' tests (no code shared with the solvers)."""

import itertools

import numpy as np


def brute_force_minimum(quadratic: np.ndarray, linear: np.ndarray) -> float:
    """min over all binary v of v^T quadratic v + linear . v, by enumeration."""
    k = len(linear)
    v = np.array(list(itertools.product([0.0, 1.0], repeat=k)))
    return float((np.einsum("mk,kl,ml->m", v, quadratic, v) + v @ linear).min())
