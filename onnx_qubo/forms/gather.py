"""Embedding tables: ``Gather(table, indices)`` reading rows (axis 0) of a constant float table
``[V, d]`` with integer indices (``--embeddings``).

Each lookup returns one row exactly, so there is no input Gram: the output error of a lookup is
the row's own weight error, the rows are independent, and within a row each weight's error is its
own. The objective is therefore each row's (or each block of a row's) squared error: its scale is
the clipping ratio of ``scales.py``'s grid with the least round-to-nearest squared error, and
round-to-nearest is then the optimal rounding (the QUBO with ``G = I`` is diagonal). Weighting
rows by how often calibration looks them up would change nothing: each row's scale and codes
minimise that row's error whatever its weight.

``match`` finds a table or says why it stays float (a table shared with another node, such as a
tied LM head, is skipped: its MatMul would need the same codes); ``quantize_table`` chooses the
codes; ``LowerTables`` rewrites each Gather (portable form below, or with format ort
onnxruntime's ``GatherBlockQuantized`` where ``kernels.choose_table_kernel`` accepts it).

Portable form (standard ONNX, opset 13; onnxruntime 1.32's Gather refuses INT4/INT2 tensors):
codes stored as bytes, ``8 // bits`` per byte (first code in the low bits, as ``pack_bits``),
one ``Gather`` of the rows looked up, unpacked by ``BitShift`` left then right, ``Cast`` to float,
``Sub`` the zero point (a ``Gather`` of the per-row zero points, or the signed offset), ``Mul``
by a ``Gather`` of the per-row (per-block) scales: only the rows looked up are dequantized.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper

from ..backends.ort import MS_DOMAIN, gather_block_quantized, pack_bits
from ..core.grid import Granularity, GroupScales, IntegerGrid, Scheme, WeightCodes
from ..core.report import LayerReport
from ..core.types import SkippedNode
from ..graph.subgraphs import node_names
from ..passes.base import PassResult, copy_model
from ..passes.insert_dequantize import GraphEdit
from ..rounding.scales import COARSE_RATIOS, FINE_STEPS, GroupRanges, row_runs
from .base import HALF_OR_FLOAT_WEIGHTS, GraphIndex, Skip, attributes

TABLE_OPSET = 13  # Unsqueeze with an axes input; BitShift (11) and Gather work from there
TABLE_ROWS = 4096  # table rows per pass: a whole 49,152-row LM table would make each [rows, d] temporary 226 MB


@dataclass(frozen=True, eq=False)
class EmbeddingTable:
    """A Gather node reading rows of a constant float table."""

    name: str  # the node's name (graph.subgraphs.node_names)
    table_name: str
    table: np.ndarray  # [V, d] float64
    indices: str
    float_type: int = onnx.TensorProto.FLOAT  # the table's type: FLOAT or FLOAT16


@dataclass(frozen=True, eq=False)
class QuantizedTable:
    """A table's codes [V, d]: row ``v`` dequantizes to ``codes.dequantize()[v]`` (scales as stored,
    in the table's float type)."""

    table: EmbeddingTable
    codes: WeightCodes
    seconds: float
    mean_squared_error: float  # over rows, of a row's error: a uniformly drawn lookup's output error

    def report(self) -> LayerReport:
        """The report row: round-to-nearest is the optimum on these scales, so the cost is its own
        certified lower bound (gap 0) and no weight has a choice left to solve."""
        v, d = self.codes.integers.shape
        cost = self.mean_squared_error
        scheme = self.codes.scheme
        return LayerReport(name=self.table.name, form="Gather (table)", n_out=v, f_in=d, bits=scheme.bits,
                           storage=onnx.TensorProto.DataType.Name(scheme.grid.storage[0]), free_fraction=0.0,
                           cost_rtn=cost, cost_solved=cost, lower_bound=cost, solve_seconds=self.seconds)


class GatherForm:
    op_type = "Gather"

    def match(self, node: onnx.NodeProto, name: str, index: GraphIndex) -> EmbeddingTable | Skip | None:
        """The table this Gather reads, a Skip saying why it stays float, or None (not a
        constant table)."""
        table_name, indices = node.input[0], node.input[1]
        if table_name not in index.initializers:
            return None
        init = index.constant_weight(indices, table_name, rank=2, types=HALF_OR_FLOAT_WEIGHTS)
        if isinstance(init, Skip):
            readers = [n for n in index.consumers.get(table_name, []) if n.output != node.output]
            if readers:
                kinds = ", ".join(sorted({f"{n.op_type} '{n.name}'" for n in readers}))
                return Skip(f"table '{table_name}' is also read by {kinds} (tied weights): quantizing it would "
                            "change that node too, which would need the same codes; left float")
            return init
        if attributes(node).get("axis", 0) != 0:
            return Skip(f"Gather along axis {attributes(node)['axis']}: only row lookups (axis 0) are quantized")
        table = index.array(init).astype(np.float64)
        if not np.isfinite(table).all():
            return Skip(f"table '{table_name}' holds NaN or Inf")
        return EmbeddingTable(name, table_name, table, indices, init.data_type)


def find_tables(model: onnx.ModelProto) -> tuple[list[EmbeddingTable], list[SkippedNode]]:
    """The constant tables of the main graph's Gathers, and the Gathers of constant tables that
    stay float (with the reason)."""

    form, index = GatherForm(), GraphIndex(model)
    tables, skipped = [], []
    for node, name in zip(model.graph.node, node_names(model.graph)):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        found = form.match(node, name, index)
        if isinstance(found, Skip):
            skipped.append(SkippedNode(name, node.op_type, found.reason))
        elif found is not None:
            tables.append(found)
    return tables, skipped


def table_scheme(scheme: Scheme) -> Scheme:
    """Tables get a scale per row (or per block of a row): ``tensor`` granularity means rows."""
    if scheme.granularity == Granularity.TENSOR:
        return Scheme(scheme.bits, Granularity.CHANNEL, 0, scheme.symmetric, scheme.scale_type)
    return scheme


def quantize_table(table: EmbeddingTable, scheme: Scheme) -> QuantizedTable:
    """Per group (row or block), the clipping ratio of ``scales.py``'s grid (10 coarse, 6 fine
    around the best) with the least round-to-nearest squared error, and the nearest codes."""
    start = time.perf_counter()
    scheme = table_scheme(scheme)
    ranges = GroupRanges(table.table, scheme)
    coarse = np.broadcast_to(COARSE_RATIOS[:, None, None], (len(COARSE_RATIOS), *ranges.shape))
    coarse_errors = np.stack([_squared_errors(table.table, ranges.scales(r), ranges.grid) for r in coarse])
    best = np.take_along_axis(coarse, coarse_errors.argmin(axis=0)[None], axis=0)[0]
    fine = np.clip(best[None] + FINE_STEPS[:, None, None], 0.01, 1.0)
    ratios = np.concatenate([coarse, fine])
    errors = np.concatenate([coarse_errors, np.stack([_squared_errors(table.table, ranges.scales(r), ranges.grid)
                                                      for r in fine])])
    chosen = np.take_along_axis(ratios, errors.argmin(axis=0)[None], axis=0)[0]
    chosen_scales = ranges.scales(chosen)
    stored = GroupScales(chosen_scales.scale.astype(scheme.scale_dtype).astype(np.float64), chosen_scales.zero_point,
                         chosen_scales.width)  # the scales that will be stored
    codes = WeightCodes(_nearest(table.table, stored, scheme), stored, scheme)
    error = _squared_errors(table.table, stored, scheme.grid).sum() / len(table.table)
    return QuantizedTable(table, codes, time.perf_counter() - start, float(error))


def quantize_table_on(table: EmbeddingTable, grids: Sequence[Scheme]) -> QuantizedTable:
    """``quantize_table`` on each of ``grids`` (an unset ``--symmetric``: both), the one with the
    least squared error kept; its time counts all of them."""
    found = [quantize_table(table, scheme) for scheme in grids]
    best = min(found, key=lambda quantized: quantized.mean_squared_error)  # the first on a tie
    return replace(best, seconds=sum(quantized.seconds for quantized in found))


def _nearest(table: np.ndarray, scales: GroupScales, scheme: Scheme) -> np.ndarray:
    """Round-to-nearest codes of ``table`` with ``scales`` (int16: a quarter of int64's memory, and
    room for the lowering's offsets)."""
    f = table.shape[1]
    codes = np.empty(table.shape, np.int16)
    for rows in row_runs(len(table), TABLE_ROWS):
        part = scales.rows(rows)
        codes[rows] = scheme.grid.round_nearest(table[rows] / part.per_column(part.scale, f)
                                                + part.per_column(part.zero_point, f))
    return codes


def _squared_errors(table: np.ndarray, scales: GroupScales, grid: IntegerGrid) -> np.ndarray:
    """Each group's squared round-to-nearest error [V, g] with ``scales`` (dequantized values less
    the table's, as a lookup reads them)."""
    f, width = table.shape[1], scales.width
    groups = -(-f // width)
    errors = np.empty(scales.scale.shape)
    for rows in row_runs(len(table), TABLE_ROWS):
        part = scales.rows(rows)
        step, zero = part.per_column(part.scale, f), part.per_column(part.zero_point, f)
        error = (grid.round_nearest(table[rows] / step + zero) - zero) * step - table[rows]
        padded = np.zeros((len(error), groups * width))
        padded[:, :f] = error * error
        errors[rows] = padded.reshape(len(error), groups, width).sum(axis=2)
    return errors


@dataclass(frozen=True, eq=False)
class TableLowering:
    """One table's codes and whether onnxruntime's ``GatherBlockQuantized`` runs it (kernels.py)."""

    quantized: QuantizedTable
    fast: bool


class LowerTables:
    """Each quantized table's Gather replaced by its lowering; the float tables dropped."""

    def __init__(self, tables: list[TableLowering]):
        self.tables = tables

    def call(self, model: onnx.ModelProto) -> PassResult:
        if not self.tables:
            return PassResult(model, modified=False)
        out = copy_model(model)
        graph = out.graph
        edit = GraphEdit(graph)
        replacements: dict[int, list[onnx.NodeProto]] = {}
        for lowering in self.tables:
            table = lowering.quantized.table
            k = next(i for i, node in enumerate(graph.node) if node.op_type == "Gather"
                     and node.input[0] == table.table_name)
            node = graph.node[k]
            codes = lowering.quantized.codes
            if lowering.fast:
                form = gather_block_quantized(codes, node.input[1], node.output[0], edit.fresh)
                if isinstance(form, str):  # kernels.choose_table_kernel accepted it
                    raise ValueError(f"table '{table.table_name}': {form}")
                graph.initializer.extend(form.initializers)
                replacements[k] = form.nodes
                if not any(o.domain == MS_DOMAIN for o in out.opset_import):
                    out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
            else:
                replacements[k] = packed_gather(codes, node.input[1], node.output[0], edit)
        nodes = [n for i, node in enumerate(graph.node) for n in replacements.get(i, [node])]
        del graph.node[:]
        graph.node.extend(nodes)
        dropped = {lowering.quantized.table.table_name for lowering in self.tables}
        for container in (graph.initializer, graph.input, graph.value_info):
            kept = [item for item in container if item.name not in dropped]
            del container[:]
            container.extend(kept)
        return PassResult(out, modified=True)


def stored_width(codes: WeightCodes) -> int:
    """Codes per stored row: ``d`` rounded up to whole blocks, then to whole bytes."""
    d = codes.integers.shape[1]
    width = -(-d // codes.block_size) * codes.block_size if codes.block_size else d
    per_byte = 8 // _container_bits(codes.bits)
    return -(-width // per_byte) * per_byte


def _container_bits(bits: int) -> int:
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def packed_bytes(codes: WeightCodes) -> np.ndarray:
    """The table as stored by the portable form: unsigned codes (signed ones offset by
    ``2^(bits-1)``; padding holds the offset or the zero point) packed ``8 // bits`` per byte."""
    v, d = codes.integers.shape
    bits = _container_bits(codes.bits)
    offset = 1 << (codes.bits - 1) if codes.signed else 0
    padded = np.full((v, stored_width(codes)), offset, np.int64)
    if codes.zero_point is not None:
        padded[:] = (codes.zero_point if codes.zero_point.ndim == 1 else codes.zero_point[:, -1])[:, None]
    padded[:, :d] = codes.integers + offset
    return padded.astype(np.uint8) if bits == 8 else pack_bits(padded, bits)


def packed_gather(codes: WeightCodes, indices: str, output: str, edit: GraphEdit) -> list[onnx.NodeProto]:
    """The portable lowering of a table lookup (module docstring): ``indices.shape + [d]`` floats
    equal to ``codes.dequantize()`` (in the scales' float type) at the rows looked up."""
    v, d = codes.integers.shape
    bits, block = _container_bits(codes.bits), codes.block_size
    per_byte, width = 8 // bits, stored_width(codes)
    groups = codes.scale.shape[1] if codes.scale.ndim == 2 else 1
    fresh = edit.fresh
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], **attrs) -> str:
        out = fresh(f"{output}_{op.lower()}")
        nodes.append(helper.make_node(op, inputs, [out], name=fresh(f"{output}_{op}"), **attrs))
        return out

    def const(label: str, value: np.ndarray) -> str:
        return edit.constant(f"{output}_{label}", value)

    def gather_rows(label: str, value: np.ndarray) -> str:
        return node("Gather", [const(label, value), indices], axis=0)

    rows = gather_rows("codes", packed_bytes(codes))  # indices.shape + [width / per_byte]
    lead = node("Shape", [indices])
    if per_byte > 1:  # code k of a byte: shift it to the top bits, then down to the bottom
        spread = node("Unsqueeze", [rows, const("last_axis", np.array([-1], np.int64))])
        lefts = np.array([8 - bits * (k + 1) for k in range(per_byte)], np.uint8)
        spread = node("BitShift", [spread, const("shift_left", lefts)], direction="LEFT")
        spread = node("BitShift", [spread, const("shift_right", np.array([8 - bits] * per_byte, np.uint8))],
                      direction="RIGHT")
        rows = node("Reshape", [spread, node("Concat", [lead, const("width", np.array([width], np.int64))],
                                                  axis=0)])
    used = groups * block if block else d
    if width != used:
        rows = _slice_last(node, const, rows, used)
    float_type, dtype = codes.scheme.scale_type, codes.scheme.scale_dtype
    values = node("Cast", [rows], to=float_type)
    per_group = (lambda t: t[:, :, None]) if block else (lambda t: t.reshape(v, 1))
    scale = np.asarray(codes.scale, dtype).reshape(v, groups)
    if codes.zero_point is None:
        zero = const("offset", np.array(1 << (codes.bits - 1), dtype))
    else:
        zero = gather_rows("zero_points", per_group(codes.zero_point.reshape(v, groups).astype(np.uint8)))
        zero = node("Cast", [zero], to=float_type)
    if block:
        split = node("Concat", [lead, const("blocks", np.array([groups, block], np.int64))], axis=0)
        values = node("Reshape", [values, split])
    values = node("Sub", [values, zero])
    values = node("Mul", [values, gather_rows("scales", per_group(scale))])
    if block:
        values = node("Reshape", [values, node("Concat", [lead, const("used", np.array([used], np.int64))], axis=0)])
        if used != d:
            values = _slice_last(node, const, values, d)
    nodes[-1].output[0] = output
    return nodes


def _slice_last(node, const, tensor: str, length: int) -> str:
    """The first ``length`` values of ``tensor``'s last axis."""
    return node("Slice", [tensor, const("start", np.array([0], np.int64)), const("end", np.array([length], np.int64)),
                          const("axis", np.array([-1], np.int64))])
