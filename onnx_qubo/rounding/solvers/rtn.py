"""Round to nearest: the baseline every other solver must beat."""

from __future__ import annotations

import numpy as np

from ...core.progress import Progress
from ..qubo import LayerProblem


class RoundToNearest:
    name = "rtn"

    def solve(self, problem: LayerProblem, seed: int = 0, progress: Progress = Progress()) -> np.ndarray:
        return problem.rounding.free & (problem.rounding.frac >= 0.5)
