"""The solver contract: a layer's QUBOs in, one rounding choice per weight out."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ...core.progress import Progress
from ..qubo import LayerProblem


class Solver(Protocol):
    """Chooses, for every free weight of a layer, round down (False) or up (True).

    ``solve`` returns a bool array shaped like the layer's weight; entries of weights that
    are not free are ignored. The same problem and seed must give the same answer.
    """

    name: str

    def solve(self, problem: LayerProblem, seed: int, progress: Progress) -> np.ndarray: ...
