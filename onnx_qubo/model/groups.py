"""A grouped (or depthwise) Conv as one layer per group, and back.

Each group of a Conv reads its own slice of the input channels, so each has its own patch Gram
matrix: one layer problem per group (the QUBO machinery unchanged), named ``conv[g]``. For the
graph and the report the groups are merged again into the one Conv they came from. The
directions of a bidirectional LSTM/RNN are split the same way (each has its own hidden states).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..core.grid import Granularity, GroupScales, WeightCodes
from ..core.report import LayerReport
from ..core.types import DenseLayer, InMemory, QuantizedBias, QuantizedLayer, RowsOf, WeightValues


def split_groups(layers: list[DenseLayer]) -> list[DenseLayer]:
    """Each grouped Conv (recurrent node) replaced by one layer per group (direction): its rows
    of the weight and bias."""
    split = []
    for layer in layers:
        groups = layer.view.problems
        if groups == 1:
            split.append(layer)
            continue
        size = layer.shape[0] // groups
        for g in range(groups):
            rows = slice(g * size, (g + 1) * size)
            split.append(replace(layer, name=f"{layer.name}[{g}]", values=RowsOf(layer.values, rows),
                                 bias=None if layer.bias is None else layer.bias[rows], group=g, parent=layer.name))
    return split


def merge_groups(quantized: list[QuantizedLayer]) -> list[QuantizedLayer]:
    """Consecutive groups of one Conv merged into that Conv (a group's tensor-wide scale becomes
    a scale per output channel, the same values)."""
    merged: list[QuantizedLayer] = []
    for q in quantized:
        last = merged[-1] if merged else None
        if q.layer.parent is not None and last is not None and last.layer.parent == q.layer.parent:
            merged[-1] = _join(last, q)
        else:
            merged.append(q)
    return [_as_whole(q) if q.layer.parent is not None else q for q in merged]


def merge_reports(layers: list[DenseLayer], reports: list[LayerReport]) -> list[LayerReport]:
    """One report row per Conv: costs and times summed over its groups."""
    merged: list[LayerReport] = []
    for layer, report in zip(layers, reports):
        last = merged[-1] if merged else None
        if layer.parent is not None and last is not None and last.name == layer.parent:
            n = last.n_out + report.n_out
            merged[-1] = replace(
                last, n_out=n, cost_rtn=last.cost_rtn + report.cost_rtn,
                storage=last.storage if last.storage == report.storage else _unsigned_storage(last.storage),
                cost_solved=last.cost_solved + report.cost_solved,
                free_fraction=(last.free_fraction * last.n_out + report.free_fraction * report.n_out) / n,
                lower_bound=_sum(last.lower_bound, report.lower_bound),
                solve_seconds=last.solve_seconds + report.solve_seconds,
                damping=max(last.damping, report.damping),
                cost_bias_corrected=_sum(last.cost_bias_corrected, report.cost_bias_corrected),
                cost_rtn_bias_corrected=_sum(last.cost_rtn_bias_corrected, report.cost_rtn_bias_corrected))
        else:
            merged.append(replace(report, name=layer.parent or report.name))
    return merged


def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def _unsigned_storage(storage: str) -> str:
    """The name of the unsigned type of a signed one's width (groups joined on the unsigned grid)."""
    return storage if storage.startswith("U") else "U" + storage


def _join(a: QuantizedLayer, b: QuantizedLayer) -> QuantizedLayer:
    """Two consecutive row runs of one Conv as one (still marked as a group until _as_whole); runs
    that chose different grids are joined on the unsigned one."""
    if a.codes.signed != b.codes.signed:
        a, b = _unsigned(a), _unsigned(b)
    bias = None
    if a.bias is not None and b.bias is not None:
        parts = (a.bias, b.bias)
        bias = QuantizedBias(np.concatenate([p.integers for p in parts]),
                             np.concatenate([np.broadcast_to(p.scale, p.integers.shape) for p in parts]),
                             np.concatenate([np.broadcast_to(p.zero_point, p.integers.shape) for p in parts]),
                             a.bias.storage)
    shift = None if a.bias_shift is None or b.bias_shift is None else np.concatenate([a.bias_shift, b.bias_shift])
    layer = replace(a.layer, values=_joined(a.layer.values, b.layer.values),
                    bias=None if a.layer.bias is None or b.layer.bias is None
                    else np.concatenate([a.layer.bias, b.layer.bias]))
    scales = GroupScales(np.vstack([a.codes.scales.scale, b.codes.scales.scale]),
                         np.vstack([a.codes.scales.zero_point, b.codes.scales.zero_point]), a.codes.scales.width)
    codes = WeightCodes(np.vstack([a.codes.integers, b.codes.integers]), scales, a.codes.scheme)
    return QuantizedLayer(layer, codes, bias, a.input_quantizer, shift)


def _unsigned(q: QuantizedLayer) -> QuantizedLayer:
    """The same layer on the unsigned grid (a bias quantized on the weights' grid moves with it)."""
    codes, bias = q.codes.unsigned(), q.bias
    if bias is not None and bias.storage == q.codes.scheme.grid.storage[0] and q.codes.signed:
        shift = 2 ** (q.codes.bits - 1)
        bias = QuantizedBias(bias.integers + shift, bias.scale, bias.zero_point + shift, codes.scheme.grid.storage[0])
    return replace(q, codes=codes, bias=bias)


def _as_whole(q: QuantizedLayer) -> QuantizedLayer:
    """The merged groups named and typed as the node they came from."""
    scheme = q.codes.scheme
    if scheme.granularity == Granularity.TENSOR:  # one scale per group: written per output channel
        scheme = replace(scheme, granularity=Granularity.CHANNEL)
    return replace(q, layer=replace(q.layer, name=q.layer.owner, group=None, parent=None),
                   codes=replace(q.codes, scheme=scheme))


def _joined(a: WeightValues, b: WeightValues) -> WeightValues:
    """Two consecutive row runs of one weight as one run."""
    if isinstance(a, RowsOf) and isinstance(b, RowsOf) and a.values is b.values and a.rows.stop == b.rows.start:
        return RowsOf(a.values, slice(a.rows.start, b.rows.stop))
    return InMemory(np.vstack([a.read(), b.read()]))
