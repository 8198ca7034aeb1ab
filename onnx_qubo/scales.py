"""Choose per-channel scales: max-abs, or a clipping ratio searched on the layer's QUBO cost.

At 2 bits a max-abs scale leaves most weights at zero; shrinking each row's scale (clipping
its largest weights) trades a few large errors for many small ones. The QUBO cost under
round-to-nearest is exactly the output error that trade causes, so it is the search criterion.
"""

from __future__ import annotations

import numpy as np

from .grid import IntegerGrid

SCALE_METHODS = ("mse", "minmax")
COARSE_RATIOS = np.linspace(0.05, 1.0, 10)
FINE_STEPS = np.array([-0.06, -0.04, -0.02, 0.02, 0.04, 0.06])


def choose_scales(method: str, weight: np.ndarray, grid: IntegerGrid, gram: np.ndarray) -> np.ndarray:
    """Per-row scales [n] by ``method`` ("minmax" or "mse")."""
    max_abs = grid.max_abs_scale(weight)
    if method == "minmax":
        return max_abs
    if method == "mse":
        return max_abs * search_clip_ratios(weight, grid, gram, max_abs)
    raise ValueError(f"unknown scale method '{method}'; choose one of {', '.join(SCALE_METHODS)}")


def search_clip_ratios(weight, grid, gram, max_abs) -> np.ndarray:
    """Per-row ratio in (0, 1] minimizing the round-to-nearest cost: a coarse common grid of
    10 ratios, then 6 finer ones around each row's best."""
    search = _RtnCosts(weight, grid, gram, max_abs)
    coarse = np.broadcast_to(COARSE_RATIOS[:, None], (len(COARSE_RATIOS), len(weight)))
    coarse_costs = search.costs(coarse)
    best = np.argmin(coarse_costs, axis=0)
    ratios, cost = COARSE_RATIOS[best], coarse_costs[best, np.arange(len(weight))]
    fine = np.clip(ratios[None, :] + FINE_STEPS[:, None], 0.01, 1.0)
    candidates = np.vstack([ratios[None, :], fine])
    costs = np.vstack([cost[None, :], search.costs(fine)])
    return candidates[np.argmin(costs, axis=0), np.arange(len(weight))]


class _RtnCosts:
    """Round-to-nearest cost of each row for candidate ratios, in float32: half the time of
    float64 on wide layers, and the ranking of candidates needs no more precision. (A Gemm's
    alpha scales every candidate of a row alike, so it does not enter.)"""

    def __init__(self, weight, grid, gram, max_abs):
        self.weight = weight.astype(np.float32)
        self.grid, self.gram = grid, gram.astype(np.float32)
        self.max_abs = max_abs.astype(np.float32)

    def costs(self, candidates: np.ndarray) -> np.ndarray:
        """Costs [m, n] for ratios ``candidates`` [m, n]."""
        costs = np.empty(candidates.shape)
        for k, ratio in enumerate(candidates):
            scale = self.max_abs * ratio.astype(np.float32)
            scaled = self.weight / scale[:, None]
            delta = scaled - self.grid.round_nearest(scaled)
            costs[k] = scale ** 2 * np.einsum("if,if->i", delta @ self.gram, delta)
        return costs
