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
        digits [D]      grid steps each of a weight's variables adds (``--levels``, grid.py):
                        [1] with two levels; with more, weight j is the D variables j*D ..
                        j*D+D-1, ``base`` is zero but on the last, and its code is the sum of
                        ``base + digits * v`` over them (absent in dumps before --levels: [1])
    neuron i's QUBO, with e = step_i * (frac_i - v) and v = 0 outside the free set J:
        E(v) = e^T G e + 2 cross_i . e + offset_i,
    i.e. v^T A v + l . v + c over J, A = P G[J, J] P with P = diag(step_i[J]),
    l = -2 P ((G a)[J] + cross_i[J]), a = step_i * frac_i, c = E(0). The layer's cost is the
    sum over i. ``onnx_qubo.rounding.exchange.read_problem(path).neuron_qubo(i)`` returns (A, l, c, J).

A solution (``--load-solution DIR``) is ``<file>.solution.npy`` beside each ``.qubo.npz``: a
[n, m] array of 0/1 (1 = round up); entries of variables that are not free are ignored. The run
that loads it must build the same problems (same model, data and flags): its steps are
checked against the dump.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DataError, OutputError
from ..core.grid import Rounding
from ..graph.files import INDEX, PROBLEM_SUFFIX, SOLUTION_SUFFIX, writable_path, write_atomically
from .qubo import LayerProblem

MAX_STEM = 100  # with the suffixes and a temporary name, far below the usual 255-byte name limit


def file_stems(layer_names: list[str]) -> list[str]:
    """File-system-safe, unique stems of at most MAX_STEM characters for layer names (exporters
    use '/' and ':' in names; a longer name keeps its start and a hash of the whole)."""
    stems: list[str] = []
    for name in layer_names:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "layer"
        if len(stem) > MAX_STEM:
            stem = f"{stem[:MAX_STEM - 9]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        candidate, k = stem, 1
        while candidate in stems:
            candidate, k = f"{stem}_{k}", k + 1
        stems.append(candidate)
    return stems


def write_problem(directory: Path, stem: str, problem: LayerProblem) -> None:
    """``<stem>.qubo.npz`` in ``directory``, written atomically (never through a symlink)."""
    buffer = io.BytesIO()
    np.savez(buffer, gram=problem.gram, step=np.broadcast_to(problem.step, problem.shape),
             frac=problem.rounding.frac, free=problem.rounding.free, base=problem.rounding.base,
             cross=problem.cross, offset=problem.offset, digits=np.asarray(problem.rounding.digits))
    _write(directory, stem + PROBLEM_SUFFIX, buffer.getvalue())


def write_index(directory: Path, entries: list[dict]) -> None:
    """``entries``: one {"layer", "file", "n_out", "f_in", "variables", "bits"} per written layer."""
    _write(directory, INDEX, json.dumps(entries, indent=2).encode())


def _write(directory: Path, name: str, data: bytes) -> None:
    """One dump file, replaced atomically; a symlink planted in the directory is refused."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{{dump_qubo}} '{directory}' cannot be created: {exc.strerror}", "dump_qubo") from None
    path = directory / name
    if path.is_symlink():
        raise OutputError(f"{{dump_qubo}}: '{path}' is a symbolic link; refusing to write through it", "dump_qubo")
    write_atomically(writable_path(path, reads=(), what="{dump_qubo} file"), data, "{dump_qubo} file")


def read_problem(path: Path) -> LayerProblem:
    """The layer problem stored at ``path`` (a ``.qubo.npz`` this module wrote)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            digits = tuple(int(d) for d in npz["digits"]) if "digits" in npz else (1,)  # two levels before --levels
            return LayerProblem(npz["gram"], npz["step"], Rounding(npz["base"], npz["frac"], npz["free"], digits),
                                npz["cross"], npz["offset"])
    except (OSError, ValueError, KeyError, EOFError, AttributeError, TypeError, zipfile.BadZipFile) as exc:
        raise DataError(f"'{path}' is not a QUBO dump (.qubo.npz with gram, step, base, frac, free, "
                        f"cross, offset): {exc}") from None


def read_solution(directory: Path, name: str, problem: LayerProblem) -> np.ndarray:
    """The rounding choice [n, f] (bool) for layer ``name``, checked against ``problem``. Only
    files directly inside ``directory`` are read, whatever its index says."""
    entry = next((e for e in _read_index(directory) if e["layer"] == name), None)
    if entry is None:
        raise DataError(f"load_solution: layer '{name}' is not in {directory / INDEX}")
    dumped = directory / entry["file"]
    solution = directory / (entry["file"][:-len(PROBLEM_SUFFIX)] + SOLUTION_SUFFIX)
    if not solution.is_file():
        raise DataError(f"load_solution: no solution file '{solution}' for layer '{name}'")
    for path in (dumped, solution):
        if path.is_symlink():
            raise DataError(f"load_solution: '{path}' is a symbolic link; only plain files in the directory are read")
    try:
        with np.load(dumped, allow_pickle=False) as npz:
            step = npz["step"]
        choice = np.load(solution, allow_pickle=False)
    except (OSError, ValueError, KeyError, EOFError, AttributeError, TypeError, zipfile.BadZipFile) as exc:
        raise DataError(f"load_solution: cannot read the files of layer '{name}': {exc}") from None
    if not isinstance(choice, np.ndarray):
        raise DataError(f"load_solution: '{solution}' must be a .npy array")
    expected = np.broadcast_to(problem.step, problem.shape)
    if step.shape != expected.shape or not np.allclose(step, expected, rtol=1e-6):
        raise DataError(f"load_solution: layer '{name}' was dumped with other scales; rerun "
                        "with the model, data and options used for dump_qubo")
    if choice.shape != problem.shape or not np.isin(choice, (0, 1)).all():
        raise DataError(f"load_solution: '{solution}' must be a {problem.shape} array of 0/1, "
                        f"got shape {choice.shape}")
    return choice.astype(bool)


def _read_index(directory: Path) -> list[dict[str, Any]]:
    """The index entries, each with a string ``layer`` and a plain ``<stem>.qubo.npz`` file name
    (no folder, no '..', no absolute path: the index cannot point outside ``directory``)."""
    path = directory / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"load_solution: cannot read '{path}': {exc}") from None
    if not isinstance(index, list) or not all(
            isinstance(e, dict) and isinstance(e.get("layer"), str) and isinstance(e.get("file"), str)
            for e in index):
        raise DataError(f"load_solution: '{path}' must be a list of {{\"layer\": ..., \"file\": ...}} entries")
    for entry in index:
        file = entry["file"]
        if Path(file).name != file or file in ("", ".", "..") or "\\" in file or not file.endswith(PROBLEM_SUFFIX):
            raise DataError(f"load_solution: '{path}' names '{file}' for layer '{entry['layer']}'; only plain "
                            f"<name>{PROBLEM_SUFFIX} file names inside the directory are accepted")
    return index
