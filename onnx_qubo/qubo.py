"""The rounding QUBO of one dense layer, and of each of its output neurons.

With ``w / s = base + frac`` (see grid.py) and a binary choice ``v`` (1 = round up) on the
free weights, neuron i's dequantized error is ``s_i (frac_i - v_i)`` and its mean squared
pre-activation error on the calibration inputs is

    C_i(v) = s_i^2 (frac_i - v)^T G (frac_i - v),      G = E[x x^T]

which is ``v^T A v - 2 h^T v + c`` with ``A = s_i^2 G[J, J]``, ``h = s_i^2 (G frac_i)[J]``,
``c = s_i^2 frac_i^T G frac_i`` over the free set J. The layer's cost is the sum over neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grid import IntegerGrid, Rounding, split_rounding


@dataclass(frozen=True, eq=False)
class NeuronQubo:
    """``E(v) = v^T quadratic v + linear . v + constant`` over the neuron's free weights."""

    quadratic: np.ndarray  # symmetric [k, k] (A)
    linear: np.ndarray  # [k] (-2 h)
    constant: float  # error of rounding every free weight down
    variables: np.ndarray  # [k] input indices of the free weights

    def upper_triangular(self) -> np.ndarray:
        """The standard QUBO matrix Q (upper triangular): ``E(v) = v^T Q v + constant``."""
        q = np.triu(2.0 * self.quadratic, 1)
        q[np.diag_indices_from(q)] = np.diag(self.quadratic) + self.linear
        return q

    def energy(self, v: np.ndarray) -> float:
        v = np.asarray(v, dtype=np.float64)
        return float(v @ self.quadratic @ v + self.linear @ v + self.constant)


@dataclass(frozen=True, eq=False)
class LayerProblem:
    """All n neuron QUBOs of a layer: they share the Gram matrix and differ by scale and frac."""

    gram: np.ndarray  # [f, f] E[x x^T]
    scale: np.ndarray  # [n] effective scale: |gain| * grid scale
    rounding: Rounding

    @property
    def shape(self) -> tuple[int, int]:
        return self.rounding.frac.shape

    def neuron_energies(self, choice: np.ndarray) -> np.ndarray:
        """Per-neuron cost [n] of a choice (bool [n, f]; ignored where a weight is not free),
        computed in the Gram matrix's precision."""
        delta = (self.rounding.frac - (choice & self.rounding.free)).astype(self.gram.dtype)
        return self.scale ** 2 * np.einsum("if,if->i", delta @ self.gram, delta)

    def energy(self, choice: np.ndarray) -> float:
        """The layer's mean squared pre-activation error for a choice."""
        return float(self.neuron_energies(choice).sum())

    def integers(self, choice: np.ndarray) -> np.ndarray:
        return self.rounding.base + (choice & self.rounding.free)

    def neuron_qubo(self, i: int) -> NeuronQubo:
        """The QUBO of output neuron i, over its free weights only."""
        variables = np.flatnonzero(self.rounding.free[i])
        frac, s2 = self.rounding.frac[i], self.scale[i] ** 2
        quadratic = s2 * self.gram[np.ix_(variables, variables)]
        h = s2 * (self.gram @ frac)[variables]
        return NeuronQubo(quadratic, -2.0 * h, float(s2 * frac @ self.gram @ frac), variables)


def build_problem(weight: np.ndarray, gain: float, scale: np.ndarray, grid: IntegerGrid,
                  gram: np.ndarray) -> LayerProblem:
    """The layer's QUBO for weights [n, f] on ``grid`` with per-row ``scale``."""
    return LayerProblem(gram, abs(gain) * scale, split_rounding(weight, scale, grid))
