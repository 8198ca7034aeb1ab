"""What a run holds in memory at its peak, and how calibration fits a budget (``max_memory``).

At its peak a run holds the float model's weights (onnxruntime keeps them while calibration
runs), the statistics of the layers calibrated in one pass over the data (float64 sums, O(f^2)
per input view; three times that when the layer sees other inputs than the float model's), one
chunk of captured activations, and one layer's solve (its QUBO: O(v^2 + n v) for v variables per
neuron, the layer's inputs times ``--levels`` - 1). When all the
statistics do not fit beside the rest, calibration runs in several passes, one per group of
consecutive layers (``calibration_groups``); a budget that cannot hold one layer is an error that
says how much it needs. Estimates, not measurements: they count the large arrays only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
from functools import cache

import onnx

from ..core.errors import OptionError
from ..core.external import tensor_bytes
from ..core.types import DenseLayer

DEFAULT_SHARE = 0.6  # of physical memory: the most a run takes without --max-memory
STATISTICS_ROOM = 10 ** 9  # without --max-memory, statistics held at once beyond the largest layer's
GB = 1e9


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system after a stage that freed large arrays (a
    view's statistics, a layer's QUBO, the calibration session): glibc keeps freed arrays of up to
    32 MB in its heap, so without this the next stage's peak adds to the last one's. A no-op
    where the C library has no ``malloc_trim``."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _malloc_trim() -> "ctypes._NamedFuncPointer | None":
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def physical_share() -> int:
    """A share of this machine's physical memory."""
    try:
        return int(DEFAULT_SHARE * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume 8 GB
        return int(DEFAULT_SHARE * 8 * GB)


def readable(count: float, *, up: bool = False) -> str:
    """A byte count in GB, MB or KB (decimal, as --max-memory takes GB), to 3 significant digits;
    ``up``: rounded up past ``count``, so that the amount said is enough once given back (an
    amount of GB given back is truncated to whole bytes)."""
    if count >= 1:
        digit = 10.0 ** (math.floor(math.log10(count)) - 2)  # the third significant digit's
        count = (math.floor((count + 1) / digit) + 1) * digit if up else round(count / digit) * digit
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} bytes"


def weights_bytes(model: onnx.ModelProto) -> int:
    """The main graph's initializers: what onnxruntime holds of the model."""
    return sum(tensor_bytes(init) for init in model.graph.initializer)


def statistics_bytes(layer: DenseLayer, drift: bool, spread: bool = False) -> int:
    """The float64 sums one layer's input statistics take (per group for a grouped Conv), counted
    in full: a bound (a dense view holds its Gram matrix as the upper triangle, grams.py), and with
    ``spread`` the float32 upper triangle of its sample spread (spread.py)."""
    f = layer.shape[1]
    return 8 * (f + 1) ** 2 * (3 if drift else 1) + (2 * f * (f + 1) if spread else 0)


def solve_bytes(layer: DenseLayer, levels: int = 2) -> int:
    """One layer's solve: its Gram matrix, weight, scales, codes and the solver's state, with
    ``levels - 1`` binary variables per weight (``--levels``: the QUBO's inputs repeated)."""
    n, f = layer.shape
    variables = (levels - 1) * (f + 1)
    return 8 * (variables ** 2 + 8 * n * variables)


def calibration_groups(layers: list[DenseLayer], max_memory: int | None, model_bytes: int,
                       drift: bool, levels: int = 2, spread: bool = False) -> list[list[DenseLayer]]:
    """``layers`` in groups whose statistics fit beside the model and one solve, each group one
    pass over the calibration data; layers reading the same input view stay together (their
    statistics are one sum). Without ``max_memory``, statistics take at most STATISTICS_ROOM (or
    the largest view) within a share of physical memory: a pass over the data costs less than
    memory the machine may not have. An OptionError when even one view does not fit."""
    views: dict[str, list[DenseLayer]] = {}
    for layer in layers:
        views.setdefault(layer.source_key, []).append(layer)
    view_bytes = {key: sum(statistics_bytes(layer, drift, spread)
                           for layer in {m.statistics_key: m for m in members}.values())
                  for key, members in views.items()}
    solving = max(solve_bytes(layer, levels) for layer in layers)
    largest = max(view_bytes, key=view_bytes.__getitem__)
    budget = physical_share() if max_memory is None else max_memory
    room = budget - model_bytes - solving
    if max_memory is None:
        room = min(room, max(STATISTICS_ROOM, view_bytes[largest]))
    if view_bytes[largest] > room:
        needed = model_bytes + solving + view_bytes[largest]
        owner = views[largest][0].owner
        raise OptionError(
            f"{{max_memory}} {readable(budget)} is too small: the model's weights take {readable(model_bytes)}, "
            f"solving its largest layer {readable(solving)}, and the input statistics of layer '{owner}' alone "
            f"{readable(view_bytes[largest])}; give at least {readable(needed, up=True)}", "max_memory")
    groups: list[list[DenseLayer]] = []
    held = 0
    for key, members in views.items():
        if not groups or held + view_bytes[key] > room:
            groups.append([])
            held = 0
        groups[-1].extend(members)
        held += view_bytes[key]
    return groups
