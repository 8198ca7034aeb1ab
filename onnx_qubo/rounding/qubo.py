"""The rounding QUBO of one dense layer, and of each of its output neurons.

Each variable j of neuron i (a weight, or the bias when it is quantized too) sits at
``base + frac`` grid steps (see grid.py); a grid step moves the neuron's output by
``step_ij`` per unit of its input z_j (Gemm's alpha times the variable's scale; the scale
differs between variables with block scales or a quantized bias). For a binary choice v
(1 = round up), the output error of the rounding is ``e_i . z`` plus, when the layer sees
other inputs than the float model's, a part the rounding cannot change, with

    e_i = step_i * (frac_i - v)                                       (element-wise)
    C_i(v) = e_i^T G e_i + 2 cross_i . e_i + offset_i,     G = E[z z^T]

the mean squared pre-activation error on the calibration inputs (``cross`` and ``offset`` are
zero when the layer's inputs are the float model's). Over the free set J this is
``v^T A v + l . v + c`` with ``A = P G[J, J] P`` (P = diag(step_i[J])),
``l = -2 P ((G a)[J] + cross_i[J])``, ``a = step_i * frac_i``, ``c = C_i(0)``. The layer's
cost is the sum over neurons.

More than two levels per weight (``levels``, grid.split_levels) is the same QUBO over more
variables: weight j becomes D binary variables worth ``digits`` grid steps each, all seeing
input z_j, so the problem is the one above on the inputs z repeated D times (Gram
``kron(G, ones(D, D))``, step ``step_ij * digits``) and the energy is still exactly the
output error of the codes ``base + digits . v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.determinism import map_threads
from ..core.grid import IntegerGrid, Rounding, split_levels

ENERGY_ROWS = 2048  # neurons per run of neuron_energies: a fixed split, so the same sums on any machine


@dataclass(frozen=True, eq=False)
class NeuronQubo:
    """``E(v) = v^T quadratic v + linear . v + constant`` over the neuron's free weights."""

    quadratic: np.ndarray  # symmetric [k, k] (A)
    linear: np.ndarray  # [k] (l)
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
    """All n neuron QUBOs of a layer: they share the Gram matrix G [m, m]."""

    gram: np.ndarray  # [m, m] E[z z^T] over the inputs the quantized layer sees
    step: np.ndarray  # [n, m], or [n, 1] when a row's variables share one scale
    rounding: Rounding  # [n, variables]
    cross: np.ndarray  # [n, m] linear coefficient of e_i (zero when inputs are the float ones)
    offset: np.ndarray  # [n] error no rounding can change

    @property
    def shape(self) -> tuple[int, int]:
        """(neurons, binary variables per neuron)."""
        return self.rounding.frac.shape

    @property
    def weights(self) -> int:
        """Weights per neuron (each is ``len(rounding.digits)`` variables)."""
        return self.shape[1] // len(self.rounding.digits)

    def errors(self, choice: np.ndarray) -> np.ndarray:
        """Each weight's output-unit error [n, weights] for a choice (bool [n, variables];
        ignored where not free): e = step * (frac - v), summed over a weight's variables."""
        e = self.step * (self.rounding.frac - (choice & self.rounding.free))
        return e.reshape(len(e), self.weights, -1).sum(axis=2)

    def neuron_energies(self, choice: np.ndarray) -> np.ndarray:
        """Per-neuron cost [n] of a choice, computed in the Gram matrix's precision (in runs of
        ENERGY_ROWS neurons on every core)."""
        def energies(rows: slice) -> np.ndarray:
            e = self.step[rows] * (self.rounding.frac[rows] - (choice[rows] & self.rounding.free[rows]))
            e = e.astype(self.gram.dtype)
            return np.einsum("im,im->i", e @ self.gram + 2.0 * self.cross[rows], e) + self.offset[rows]

        n = self.shape[0]
        return np.concatenate(map_threads(energies, [slice(a, a + ENERGY_ROWS) for a in range(0, n, ENERGY_ROWS)]))

    def energy(self, choice: np.ndarray) -> float:
        """The layer's mean squared pre-activation error for a choice."""
        return float(self.neuron_energies(choice).sum())

    def integers(self, choice: np.ndarray) -> np.ndarray:
        """The grid codes [n, weights] of a choice."""
        return self.rounding.integers(choice)

    def neuron_qubo(self, i: int) -> NeuronQubo:
        """The QUBO of output neuron i, over its free variables only."""
        variables = np.flatnonzero(self.rounding.free[i])
        step = np.broadcast_to(self.step[i], self.shape[1:])
        a = step * self.rounding.frac[i]
        p = step[variables]
        quadratic = p[:, None] * self.gram[np.ix_(variables, variables)] * p[None, :]
        linear = -2.0 * p * ((self.gram @ a)[variables] + self.cross[i, variables])
        constant = float(a @ self.gram @ a + 2.0 * self.cross[i] @ a + self.offset[i])
        return NeuronQubo(quadratic, linear, constant, variables)


def repeated_gram(gram: np.ndarray, variables: int) -> np.ndarray:
    """A Gram matrix over weights as the QUBO's over their ``variables`` binary variables each
    (``--levels`` above 2: the inputs repeated once per variable)."""
    return gram if variables == 1 else np.kron(gram, np.ones((variables, variables), dtype=gram.dtype))


def build_problem(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int, gain,
                  grid: IntegerGrid, gram: np.ndarray, cross: np.ndarray | None = None,
                  offset: np.ndarray | None = None, levels: int = 2) -> LayerProblem:
    """The QUBO for ``values`` [n, m] quantized as ``scale * (q - zero_point)`` on ``grid``
    (scale and zero point [n, m] or broadcastable), each column's output scaled by ``gain``
    (a number or [m]), each value choosing among ``levels`` grid points around it."""
    scaled = values / scale
    scaled += zero_point  # in place: an LM head's [n, m] temporaries are 226 MB each
    rounding = split_levels(scaled, grid, levels)
    del scaled
    n, m = values.shape
    step = scale if np.isscalar(gain) and gain == 1.0 else gain * scale  # the same values, no copy
    digits = rounding.digits
    if len(digits) > 1:  # the inputs repeated once per variable of a weight (see the module's docstring)
        step = (np.broadcast_to(step, (n, m))[:, :, None] * np.asarray(digits, dtype=float)).reshape(n, -1)
        gram = repeated_gram(gram, len(digits))
        cross = None if cross is None else np.repeat(cross, len(digits), axis=1)
    variables = rounding.frac.shape[1]
    return LayerProblem(gram, step, rounding,
                        np.broadcast_to(0.0, (n, variables)) if cross is None else cross,  # read-only zeros, no copy
                        np.zeros(n) if offset is None else offset)
