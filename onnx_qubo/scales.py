"""Choose per-channel scales: max-abs, or a clipping ratio searched on the layer's QUBO cost.

At 2 bits a max-abs scale leaves most weights at zero; shrinking each row's scale (clipping
its largest weights) trades a few large errors for many small ones. The QUBO cost under
round-to-nearest is exactly the output error that trade causes, so it is the search criterion.
"""

from __future__ import annotations

import numpy as np

from .grid import IntegerGrid
from .qubo import build_problem
from .solvers.rtn import RoundToNearest

SCALE_METHODS = ("mse", "minmax")
COARSE_RATIOS = np.linspace(0.05, 1.0, 12)
FINE_STEPS = np.linspace(-0.045, 0.045, 7)


def choose_scales(method: str, weight: np.ndarray, gain: float, grid: IntegerGrid,
                  gram: np.ndarray) -> np.ndarray:
    """Per-row scales [n] by ``method`` ("minmax" or "mse")."""
    max_abs = grid.max_abs_scale(weight)
    if method == "minmax":
        return max_abs
    if method == "mse":
        return max_abs * search_clip_ratios(weight, gain, grid, gram, max_abs)
    raise ValueError(f"unknown scale method '{method}'; choose one of {', '.join(SCALE_METHODS)}")


def search_clip_ratios(weight, gain, grid, gram, max_abs) -> np.ndarray:
    """Per-row ratio in (0, 1] minimizing the round-to-nearest cost: a coarse common grid of
    12 ratios, then 7 finer ones around each row's best."""
    ratios = _best(weight, gain, grid, gram, max_abs,
                   np.broadcast_to(COARSE_RATIOS[:, None], (len(COARSE_RATIOS), len(weight))))
    fine = np.clip(ratios[None, :] + FINE_STEPS[:, None], 0.01, 1.0)
    return _best(weight, gain, grid, gram, max_abs, np.vstack([ratios[None, :], fine]))


def _best(weight, gain, grid, gram, max_abs, candidates: np.ndarray) -> np.ndarray:
    """For each row, the candidate ratio (rows of ``candidates`` [m, n]) of least RTN cost.

    Costs are compared in float32 (half the time of float64 on wide layers; the ranking of
    candidates does not need more precision).
    """
    rtn = RoundToNearest()
    gram = gram.astype(np.float32)
    costs = np.empty(candidates.shape)
    for k, ratio in enumerate(candidates):
        problem = build_problem(weight, gain, max_abs * ratio, grid, gram)
        costs[k] = problem.neuron_energies(rtn.solve(problem))
    return candidates[np.argmin(costs, axis=0), np.arange(candidates.shape[1])]
