"""Exact solver: branch and bound that proves each neuron's rounding optimal (the ground truth
for tests and benchmarks), for neurons with up to ``max_free`` free weights (default 40).

For binary v, ``v^T A v - 2 h^T v = v^T (A + eps I) v - (2 h + eps)^T v`` exactly (v_j^2 = v_j),
so with ``A' = A + eps I = R^T R`` (R upper triangular) the neuron's energy is
``||R (v - t)||^2 + const``. Fixing variables from the last to the first, each fixed row of R
adds a non-negative term: the partial sum is a lower bound on every completion, and a branch
whose partial sum reaches the best energy known can be dropped (sphere decoding). The search
expands a whole frontier of partial assignments per level with numpy, depth-first over chunks
of at most ``chunk`` states, starting from the fast solver's rounding as the incumbent.
Variables are ordered so that rows with the largest diagonal come first (strong pruning early).
"""

from __future__ import annotations

import numpy as np

from ...core.errors import SolverLimitError
from ...core.progress import Progress
from ..qubo import LayerProblem
from .fast import FastSolver


class ExactSolver:
    name = "exact"

    def __init__(self, max_free: int = 40, chunk: int = 1 << 16):
        self.max_free = max_free
        self.chunk = chunk

    def solve(self, problem: LayerProblem, seed: int = 0, progress: Progress = Progress()) -> np.ndarray:
        free_counts = problem.rounding.free.sum(axis=1)
        if free_counts.max(initial=0) > self.max_free:
            raise SolverLimitError(
                f"the exact solver handles at most {self.max_free} free weights per neuron; this "
                f"layer has up to {free_counts.max()} (choose another solver)")
        return optimal_rounding(problem, FastSolver().solve(problem, seed), self.chunk, progress)


def optimal_rounding(problem: LayerProblem, incumbent: np.ndarray, chunk: int = 1 << 16,
                     progress: Progress = Progress()) -> np.ndarray:
    """Each neuron's proven optimum by branch and bound from ``incumbent`` (exponential in its
    free weights: for neurons of a few dozen at most)."""
    choice = np.zeros(problem.shape, dtype=bool)
    with progress.bar(problem.shape[0], "exact") as bar:
        for i in range(problem.shape[0]):
            qubo = problem.neuron_qubo(i)
            if len(qubo.variables):
                choice[i, qubo.variables] = minimize_binary_quadratic(
                    qubo.quadratic, qubo.linear, incumbent[i, qubo.variables], chunk)
            bar.update(1)
    return choice


def minimize_binary_quadratic(quadratic: np.ndarray, linear: np.ndarray, start: np.ndarray,
                              chunk: int = 1 << 16) -> np.ndarray:
    """A minimizer of ``v^T quadratic v + linear . v`` over binary v (quadratic PSD), proven by
    branch and bound; ``start`` is any binary vector, used as the first incumbent."""
    k = len(linear)
    eps = 1e-9 * max(float(np.abs(np.diag(quadratic)).max(initial=0.0)), 1e-300)
    shifted = quadratic + eps * np.eye(k)
    order = _pruning_order(shifted)
    a = shifted[np.ix_(order, order)]
    lin = (linear - eps)[order]
    upper = np.linalg.cholesky(a).T  # a = upper^T upper
    center = np.linalg.solve(a, -0.5 * lin)

    def distance(v):
        return float(np.sum((upper @ (v - center)) ** 2))

    best_v = np.asarray(start, dtype=np.float64)[order]
    best = distance(best_v)
    # A state: partial sums s = upper[:, fixed] @ (v_fixed - center_fixed) for all rows,
    # the bound so far, and the fixed bits. Levels go from variable k-1 down to 0.
    stack = [(k - 1, np.zeros((1, k)), np.zeros(1), np.zeros((1, k)))]
    while stack:
        level, sums, bound, bits = stack.pop()
        for value in (0.0, 1.0):
            step = value - center[level]
            term = (upper[level, level] * step + sums[:, level]) ** 2
            new_bound = bound + term
            keep = new_bound < best * (1 - 1e-12)
            if not keep.any():
                continue
            new_sums = sums[keep] + step * upper[:, level]
            new_bits = bits[keep].copy()
            new_bits[:, level] = value
            if level == 0:
                j = int(np.argmin(new_bound[keep]))
                best, best_v = float(new_bound[keep][j]), new_bits[j]
                continue
            for s in range(0, len(new_bound[keep]), chunk):
                stack.append((level - 1, new_sums[s:s + chunk], new_bound[keep][s:s + chunk],
                              new_bits[s:s + chunk]))
    result = np.zeros(k, dtype=bool)
    result[order] = best_v > 0.5
    return result


def _pruning_order(a: np.ndarray) -> np.ndarray:
    """Order variables so that the Cholesky factor's trailing diagonal entries (fixed first)
    are as large as possible: repeatedly put last the variable least explained by the rest,
    i.e. with the largest 1 / (A^-1)_jj (V-BLAST ordering)."""
    inverse = np.linalg.inv(a)
    remaining = list(range(len(a)))
    tail = []
    while remaining:
        sub = inverse
        j = int(np.argmin(np.diag(sub)))
        tail.append(remaining.pop(j))
        col = sub[:, j].copy()
        inverse = np.delete(np.delete(sub - np.outer(col, col) / col[j], j, axis=0), j, axis=1)
    return np.array(tail[::-1])
