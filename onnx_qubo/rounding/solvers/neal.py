"""The paper's method: dwave-neal simulated annealing on each output neuron's QUBO in turn."""

from __future__ import annotations

import dimod
import numpy as np
from neal import SimulatedAnnealingSampler

from ...core.progress import Progress
from ..qubo import LayerProblem


class NealSolver:
    """One dimod BQM per neuron, sampled with dwave-neal; keeps the lowest-energy read.

    ``num_reads``/``num_sweeps`` left as None use neal's defaults, as the paper did.
    Neuron i is sampled with seed ``seed + i``, so results do not depend on chunking.
    """

    name = "neal"

    def __init__(self, num_reads: int | None = None, num_sweeps: int | None = None):
        self.params = {key: value for key, value in
                       (("num_reads", num_reads), ("num_sweeps", num_sweeps)) if value is not None}

    def solve(self, problem: LayerProblem, seed: int = 0, progress: Progress = Progress()) -> np.ndarray:
        sampler = SimulatedAnnealingSampler()
        choice = np.zeros(problem.shape, dtype=bool)
        with progress.bar(problem.shape[0], "neal") as bar:
            for i in range(problem.shape[0]):
                qubo = problem.neuron_qubo(i)
                if len(qubo.variables):
                    bqm = neuron_bqm(qubo.upper_triangular(), qubo.constant)
                    best = sampler.sample(bqm, seed=(seed + i) % 2**32, **self.params).first.sample
                    choice[i, qubo.variables] = [bool(best[j]) for j in range(len(qubo.variables))]
                bar.update(1)
        return choice


def neuron_bqm(upper: np.ndarray, constant: float) -> dimod.BinaryQuadraticModel:
    """A BINARY dimod model from an upper-triangular QUBO matrix (variables 0..k-1)."""
    return dimod.BinaryQuadraticModel(np.diag(upper).copy(), np.triu(upper, 1), constant, "BINARY")
