"""Solvers for the per-layer rounding QUBO, all behind the ``Solver`` contract of base.py."""

from .base import Solver
from .exact import ExactSolver
from .fast import FastSolver
from .neal import NealSolver
from .rtn import RoundToNearest

SOLVERS = {"fast": FastSolver, "neal": NealSolver, "rtn": RoundToNearest, "exact": ExactSolver}  # CLI name -> class

__all__ = ["SOLVERS", "Solver", "ExactSolver", "FastSolver", "NealSolver", "RoundToNearest"]
