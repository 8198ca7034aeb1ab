"""Write each layer's QUBOs for other solvers (quantum annealers included) and read their
roundings back.

Layout of a dump directory (``--dump-qubo DIR``):

    index.json               [{"layer", "file", "n_out", "f_in", "variables", "bits"}, ...]
    <file>.qubo.npz          one layer, arrays (m variables per neuron: its f weights, plus its
                             bias when the bias is quantized):
        gram   [m, m]   E[z z^T] over the inputs the quantized layer sees (shared by all neurons)
        step   [n, m]   output change per grid step of each variable (alpha x its scale)
        frac   [n, m]   where each variable sits above its floor (grid units, zero point included)
        free   [n, m]   True where the variable may round down (v=0) or up (v=1)
        base   [n, m]   integer the variable takes when v=0 (clamped value when not free)
        cross  [n, m]   linear coefficient (zero unless inputs are quantized or --sequential)
        offset [n]      error no rounding changes
    neuron i's QUBO, with e = step_i * (frac_i - v) and v = 0 outside the free set J:
        E(v) = e^T G e + 2 cross_i . e + offset_i,
    i.e. v^T A v + l . v + c over J, A = P G[J, J] P with P = diag(step_i[J]),
    l = -2 P ((G a)[J] + cross_i[J]), a = step_i * frac_i, c = E(0). The layer's cost is the
    sum over i. ``onnx_qubo.exchange.read_problem(path).neuron_qubo(i)`` returns (A, l, c, J).

A solution (``--load-solution DIR``) is ``<file>.solution.npy`` beside each ``.qubo.npz``: a
[n, m] array of 0/1 (1 = round up); entries of variables that are not free are ignored. The run
that loads it must build the same problems (same model, data and flags): its steps are
checked against the dump.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .errors import QuboInputError
from .grid import Rounding
from .qubo import LayerProblem

INDEX = "index.json"


def file_stems(layer_names: list[str]) -> list[str]:
    """File-system-safe, unique stems for layer names (exporters use '/' and ':' in names)."""
    stems: list[str] = []
    for name in layer_names:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "layer"
        candidate, k = stem, 1
        while candidate in stems:
            candidate, k = f"{stem}_{k}", k + 1
        stems.append(candidate)
    return stems


def write_problem(directory: Path, stem: str, problem: LayerProblem) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / f"{stem}.qubo.npz", gram=problem.gram,
             step=np.broadcast_to(problem.step, problem.shape), frac=problem.rounding.frac,
             free=problem.rounding.free, base=problem.rounding.base, cross=problem.cross,
             offset=problem.offset)


def write_index(directory: Path, entries: list[dict]) -> None:
    """``entries``: one {"layer", "file", "n_out", "f_in", "variables", "bits"} per written layer."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INDEX).write_text(json.dumps(entries, indent=2))


def read_problem(path: Path) -> LayerProblem:
    with np.load(path) as npz:
        return LayerProblem(npz["gram"], npz["step"], Rounding(npz["base"], npz["frac"], npz["free"]),
                            npz["cross"], npz["offset"])


def read_solution(directory: Path, name: str, problem: LayerProblem) -> np.ndarray:
    """The rounding choice [n, f] (bool) for layer ``name``, checked against ``problem``."""
    index = _read_index(directory)
    entry = next((e for e in index if e["layer"] == name), None)
    if entry is None:
        raise QuboInputError(f"--load-solution: layer '{name}' is not in {directory / INDEX}")
    dumped = directory / entry["file"]
    solution = dumped.with_name(dumped.name.replace(".qubo.npz", ".solution.npy"))
    if not solution.is_file():
        raise QuboInputError(f"--load-solution: no solution file '{solution}' for layer '{name}'")
    try:
        with np.load(dumped) as npz:
            step = npz["step"]
        choice = np.load(solution, allow_pickle=False)
    except (OSError, ValueError, KeyError) as exc:
        raise QuboInputError(f"--load-solution: cannot read the files of layer '{name}': {exc}") from None
    expected = np.broadcast_to(problem.step, problem.shape)
    if step.shape != expected.shape or not np.allclose(step, expected, rtol=1e-6):
        raise QuboInputError(f"--load-solution: layer '{name}' was dumped with other scales; rerun "
                             "with the model, data and flags used for --dump-qubo")
    if choice.shape != problem.shape or not np.isin(choice, (0, 1)).all():
        raise QuboInputError(f"--load-solution: '{solution}' must be a {problem.shape} array of 0/1, "
                             f"got shape {choice.shape}")
    return choice.astype(bool)


def _read_index(directory: Path) -> list[dict]:
    try:
        return json.loads((directory / INDEX).read_text())
    except (OSError, ValueError) as exc:
        raise QuboInputError(f"--load-solution: cannot read '{directory / INDEX}': {exc}") from None
