"""Certified lower bounds on each neuron's optimal QUBO energy: how far from optimal a
rounding can be at most.

The bound relaxes v from {0,1} to the box [0,1] (the box-relaxed QP; DESIGN.md, "The objective")
and minimizes the convex ``phi(y) = e^T G e + 2 c . e``, ``e = p * (u - y)`` over it, batched
over neurons, with accelerated projected gradient (FISTA). The value at any iterate is not a
bound, so we return the Frank-Wolfe certificate ``phi(y) + min_{z in box} grad(y) . (z - y)``,
which is a valid lower bound at every iterate, converging to the relaxation's optimum.

It is weak when G is singular (dead or perfectly correlated inputs let a fractional y cancel
the error): then it mostly measures what the clamped weights cost. Proving optimality on small
neurons is the exact solver's job.
"""

from __future__ import annotations

import numpy as np

from .qubo import LayerProblem

WORK = 1 << 32  # multiply-adds spent per layer; iterations = WORK / (n m^2), within 3..200


def lower_bounds(problem: LayerProblem, chunk_bytes: int = 256 << 20) -> np.ndarray:
    """Per-neuron lower bound [n] on the minimal energy (same units as ``neuron_energies``).

    Cost: ``iterations + 1`` float64 products of the [n, m] iterate with G (at least 4, i.e.
    about twice the cost of reporting the solved and round-to-nearest energies) plus 50
    matrix-vector products; on wide real layers it certifies little (see the module note), so
    callers should make it opt-in."""
    n, m = problem.shape
    gram = problem.gram
    iterations = int(np.clip(WORK // max(n * m * m, 1), 3, 200))
    largest = max(_largest_eigenvalue(gram), 1e-300)
    step = np.broadcast_to(problem.step, (n, m))
    rows_per_chunk = max(1, int(chunk_bytes // (8 * m * 8)))
    bounds = np.empty(n)
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n))
        bounds[rows] = _box_bound(gram, step[rows], problem.rounding.frac[rows], problem.rounding.free[rows],
                                  problem.cross[rows], largest, iterations)
    return np.maximum(bounds + problem.offset, 0.0)


def _box_bound(gram, step, frac, free, cross, largest, iterations) -> np.ndarray:
    def value_and_gradient(y):
        e = step * (frac - y)
        g_e = e @ gram + cross
        return np.einsum("if,if->i", g_e + cross, e), -2.0 * step * g_e

    # 1 / Lipschitz constant of the gradient, per neuron: 2 lambda_max(G) max_j p_j^2
    rate = 1.0 / (2.0 * largest * np.maximum((step ** 2).max(axis=1, keepdims=True), 1e-300))
    y = np.where(free, np.clip(frac, 0.0, 1.0), 0.0)
    z, t = y.copy(), 1.0
    for _ in range(iterations):
        _, grad = value_and_gradient(z)
        y_next = np.where(free, np.clip(z - rate * grad, 0.0, 1.0), 0.0)
        t_next = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = y_next + ((t - 1.0) / t_next) * (y_next - y)
        y, t = y_next, t_next
    value, grad = value_and_gradient(y)
    descent = np.where(free, np.minimum(-grad * y, grad * (1.0 - y)), 0.0)
    return value + descent.sum(axis=1)


def _largest_eigenvalue(gram: np.ndarray, iterations: int = 50) -> float:
    """Power iteration with a 1% margin, for the gradient step 1/L. (An underestimate would
    only slow convergence: the certificate is a valid bound at any iterate.)"""
    x = np.ones(len(gram)) / np.sqrt(len(gram))
    value = 0.0
    for _ in range(iterations):
        y = gram @ x
        value = float(np.linalg.norm(y))
        if value == 0.0:
            return 0.0
        x = y / value
    return 1.01 * value
