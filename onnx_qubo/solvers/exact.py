"""Brute force over every rounding of each neuron: the ground truth tests compare against."""

from __future__ import annotations

import numpy as np

from ..errors import QuboInputError
from ..progress import Progress
from ..qubo import LayerProblem

CHUNK = 1 << 16


class ExactSolver:
    """Enumerates all 2^k choices of each neuron; refuses neurons with more than ``max_free``."""

    name = "exact"

    def __init__(self, max_free: int = 20):
        self.max_free = max_free

    def solve(self, problem: LayerProblem, seed: int = 0, progress: Progress = Progress()) -> np.ndarray:
        free_counts = problem.rounding.free.sum(axis=1)
        if free_counts.max(initial=0) > self.max_free:
            raise QuboInputError(
                f"the exact solver handles at most {self.max_free} free weights per neuron; this "
                f"layer has up to {free_counts.max()} (use another --solver)")
        choice = np.zeros(problem.shape, dtype=bool)
        with progress.bar(problem.shape[0], "exact") as bar:
            for i in range(problem.shape[0]):
                qubo = problem.neuron_qubo(i)
                choice[i, qubo.variables] = minimize_by_enumeration(qubo.quadratic, qubo.linear)
                bar.update(1)
        return choice


def minimize_by_enumeration(quadratic: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """The first minimizer of ``v^T quadratic v + linear . v`` over all binary v."""
    k = len(linear)
    best_energy, best = np.inf, np.zeros(k, dtype=bool)
    bits = 1 << np.arange(k)
    for start in range(0, 1 << k, CHUNK):
        codes = np.arange(start, min(start + CHUNK, 1 << k))
        v = ((codes[:, None] & bits) != 0).astype(np.float64)
        energies = np.einsum("mk,mk->m", v @ quadratic, v) + v @ linear
        j = int(np.argmin(energies))
        if energies[j] < best_energy:
            best_energy, best = energies[j], v[j].astype(bool)
    return best
