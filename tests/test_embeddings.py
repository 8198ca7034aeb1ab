"""Embedding tables (``--embeddings``, forms/gather.py): every lowering of a table lookup returns
exactly the rows numpy dequantizes from the integers read back out of the written model, at
onnxruntime's disabled, basic and default levels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import runs
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.backends.kernels import Format, choose_table_kernel
from onnx_qubo.core.grid import Granularity, Scheme, WeightCodes
from onnx_qubo.forms import gather
from onnx_qubo.forms.gather import LowerTables, TableLowering, find_tables, quantize_table
from onnx_qubo.model.lowering import rewrite
from onnx_qubo.passes import run_passes
from onnx_qubo.rounding.scales import GroupRanges

LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def table_model(vocab: int = 40, width: int = 32, n: int = 6, tied: bool = False, seed: int = 0) -> onnx.ModelProto:
    """ids [batch, seq] -> Gather(table) -> MatMul(W) -> y; with ``tied``, a Gemm also reads the
    table (a tied LM head: logits = h @ table^T)."""
    rng = np.random.default_rng(seed)
    table = numpy_helper.from_array(rng.normal(size=(vocab, width)).astype(np.float32), "table")
    weight = numpy_helper.from_array(rng.normal(size=(width, n)).astype(np.float32), "W")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed", axis=0),
             helper.make_node("MatMul", ["emb", "W"], ["y"], name="proj")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])]
    if tied:
        nodes += [helper.make_node("Reshape", ["emb", "flat_shape"], ["flat"]),
                  helper.make_node("Gemm", ["flat", "table"], ["logits"], name="head", transB=1)]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", vocab]))
    inits = [table, weight] + ([numpy_helper.from_array(np.array([-1, width], np.int64), "flat_shape")] if tied else [])
    graph = helper.make_graph(nodes, "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                                 ["batch", "seq"])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def lookup_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model cut after the lookup: output 'emb'."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "seq", "d"]))
    return out


def run(model: onnx.ModelProto, ids: np.ndarray, level) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})[0]


def unpack(stored: np.ndarray, bits: int, width: int) -> np.ndarray:
    """The test's own reading of packed bytes: code k of a byte sits at bits [k * bits, (k+1) * bits)."""
    per_byte = 8 // bits
    codes = [(stored >> (k * bits)) & ((1 << bits) - 1) for k in range(per_byte)]
    return np.stack(codes, axis=-1).reshape(len(stored), -1)[:, :width].astype(np.int64)


def initializer(model: onnx.ModelProto, suffix: str) -> np.ndarray:
    found = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith(suffix)]
    assert len(found) == 1, suffix
    return found[0]


IDS = np.array([[0, 5, 39, 5], [-1, 7, 12, -40]], np.int64)  # repeated and negative (from the end) rows
SCHEMES = [(bits, granularity, block, symmetric) for bits in (1, 2, 3, 4, 6, 8)
           for granularity, block in ((Granularity.CHANNEL, 0), (Granularity.BLOCK, 16), (Granularity.BLOCK, 12))
           for symmetric in (True, False) if bits > 1 or symmetric]


@pytest.mark.parametrize("bits,granularity,block,symmetric", SCHEMES)
def test_portable_lookup_returns_the_rows_of_the_integers_read_back(bits, granularity, block, symmetric):
    model = table_model(width=30)  # 30: padding to whole blocks and whole bytes
    (table,), _ = find_tables(model)
    q = quantize_table(table, Scheme(bits, granularity, block, symmetric))
    written = run_passes(lookup_model(model), [LowerTables([TableLowering(q, fast=False)])]).model
    onnx.checker.check_model(written)
    assert not any(i.name == "table" for i in written.graph.initializer)
    container = 2 if bits <= 2 else 4 if bits <= 4 else 8
    codes = unpack(initializer(written, "_codes"), container, 30)
    scale = initializer(written, "_scales").reshape(40, -1)
    offset = 1 << (bits - 1) if symmetric else initializer(written, "_zero_points").reshape(40, -1).astype(np.int64)
    assert np.array_equal(codes - (offset if symmetric else 0), q.codes.integers)
    per_column = (lambda v: np.repeat(v, block, axis=1)[:, :30]) if block else (lambda v: v)
    expected = ((codes - per_column(np.broadcast_to(offset, scale.shape))).astype(np.float32) * per_column(scale))
    for level in LEVELS:
        got = run(written, IDS, level)
        assert got.dtype == np.float32 and got.shape == (2, 4, 30)
        assert np.array_equal(got, expected[IDS])


@pytest.mark.parametrize("bits,granularity,block,symmetric",
                         [s for s in SCHEMES if s[2] != 12])  # blocks of 12 are refused (below)
def test_gather_block_quantized_returns_the_rows_of_the_codes(bits, granularity, block, symmetric):
    model = table_model(width=32)
    (table,), _ = find_tables(model)
    q = quantize_table(table, Scheme(bits, granularity, block, symmetric))
    fast, kernel = choose_table_kernel("embed", q.codes, Format.ORT)
    assert fast and kernel.kernel == "GatherBlockQuantized", kernel
    written = run_passes(lookup_model(model), [LowerTables([TableLowering(q, fast=True)])]).model
    assert [n.op_type for n in written.graph.node] == ["GatherBlockQuantized", "MatMul"]
    node = written.graph.node[0]
    attrs = {a.name: a.i for a in node.attribute}
    stored = initializer(written, "_table")
    codes = stored.astype(np.int64) if attrs["bits"] == 8 else unpack(stored, attrs["bits"], 32)
    offset = 1 << (attrs["bits"] - 1) if symmetric else 0
    assert np.array_equal(codes - offset, q.codes.integers)
    expected = q.codes.dequantize().astype(np.float32)  # float32((q - z) * s): one rounding, as the kernel
    for level in LEVELS:
        assert np.array_equal(run(written, IDS, level), expected[IDS])


def test_tables_the_kernel_cannot_take_keep_the_portable_lookup_and_say_why():
    odd = table_model(width=31)
    (table,), _ = find_tables(odd)
    fast, kernel = choose_table_kernel("embed", quantize_table(table, Scheme(4)).codes, Format.ORT)
    assert not fast and "whole bytes" in kernel.fallback
    (table,), _ = find_tables(table_model())
    fast, kernel = choose_table_kernel("embed", quantize_table(table, Scheme(4, Granularity.BLOCK, 12)).codes,
                                       Format.ORT)
    assert not fast and "blocks of 12" in kernel.fallback
    assert choose_table_kernel("embed", quantize_table(table, Scheme(4)).codes, Format.QDQ)[0] is False


def test_scale_search_beats_the_full_range_and_rounds_to_nearest():
    (table,), _ = find_tables(table_model(vocab=200, width=64))
    scheme = Scheme(3)
    q = quantize_table(table, scheme)
    ranges = GroupRanges(table.table, scheme)
    full = ranges.scales(np.ones(ranges.shape))
    full_error = WeightCodes(scheme.grid.round_nearest(table.table / full.scale).astype(np.int64), full,
                             scheme).dequantize() - table.table
    assert q.mean_squared_error < float((full_error ** 2).sum(axis=1).mean())
    codes = q.codes
    step = np.asarray(codes.scale, np.float64)[:, None]
    # each code is the grid point nearest its weight (the optimum with G = I), clipped weights included
    grid = np.arange(-4, 4)
    best = np.abs(grid[None, None, :] * step[:, :, None] - table.table[:, :, None]).min(axis=2)
    assert np.all(np.abs(q.codes.integers * step - table.table) <= best + 1e-12)
    assert np.any(np.abs(table.table / step) > 3.5)  # the search clipped some weights


def test_out_of_range_index_fails_like_gather_in_the_portable_form_and_reads_zeros_in_the_kernel():
    model = lookup_model(table_model())
    (table,), _ = find_tables(model)
    q = quantize_table(table, Scheme(4))
    bad = np.array([[1, 40]], np.int64)
    for lowering in (None, TableLowering(q, fast=False)):
        tested = model if lowering is None else run_passes(model, [LowerTables([lowering])]).model
        with pytest.raises(Exception, match="out of|bounds|range"):
            run(tested, bad, LEVELS[2])
    fast = run_passes(model, [LowerTables([TableLowering(q, fast=True)])]).model
    got = run(fast, bad, LEVELS[2])  # onnxruntime 1.32's GatherBlockQuantized: a row of zeros
    assert np.array_equal(got[0, 1], np.zeros(32, np.float32))
    assert np.array_equal(got[0, 0], q.codes.dequantize().astype(np.float32)[1])


def test_tied_table_is_skipped_with_the_reason():
    tables, skipped = find_tables(table_model(tied=True))
    assert tables == []
    assert [s.name for s in skipped] == ["embed"] and "tied" in skipped[0].reason and "Gemm 'head'" in skipped[0].reason


@pytest.mark.parametrize("format", ["qdq", "ort"])
@pytest.mark.slow
def test_quantize_with_embeddings_writes_the_table_as_codes(format, tmp_path):
    model = table_model(vocab=60, width=32, n=8)
    rng = np.random.default_rng(1)
    data = {"ids": rng.integers(0, 60, size=(16, 5))}
    out = tmp_path / "q.onnx"
    report = runs.quantize(model, out, bits=4, calibration=data, format=format, embeddings=True, speed=False)
    written = onnx.load(str(out))
    assert not any(i.name == "table" for i in written.graph.initializer)
    rows = {layer.name: layer for layer in report.layers}
    assert rows["embed"].kernel == ("GatherBlockQuantized" if format == "ort" else "Gather+Mul")
    assert rows["embed"].gap == 0.0
    assert report.evaluation.mean_cosine > 0.99
    plain = runs.quantize(model, tmp_path / "p.onnx", bits=4, calibration=data, speed=False)
    assert "embed" not in {layer.name for layer in plain.layers}
    assert any(i.name == "table" for i in onnx.load(str(tmp_path / "p.onnx")).graph.initializer)
    assert plain.output_bytes > report.output_bytes


@pytest.mark.parametrize("bits, head_bits, table_bits", [(2, None, 4), (3, None, 4), (2, 2, 2), (4, None, 4),
                                                       (6, None, 6), (3, 8, 8)])
def test_tables_get_the_output_layers_width(bits, head_bits, table_bits, tmp_path):
    """An embedding table is the model's input end as the head is its output end: at --head-bits
    (4 below 4 bits by default), which the notes name; --head-bits sets it."""
    model = table_model(vocab=60, width=32, n=8)
    data = {"ids": np.random.default_rng(1).integers(0, 60, size=(16, 5))}
    options = {} if head_bits is None else {"head_bits": head_bits}
    report = runs.quantize(model, tmp_path / "q.onnx", bits=bits, calibration=data, embeddings=True, speed=False,
                           **options)
    rows = {layer.name: layer for layer in report.layers}
    assert rows["embed"].bits == table_bits and rows["embed"].stored_bits == (2 if table_bits <= 2 else
                                                                             4 if table_bits <= 4 else 8)
    named = [note for note in report.notes if "embedding table embed at" in note]
    assert named == ([] if table_bits == bits else [next(n for n in named if f"at {table_bits} bits" in n)])


def test_rewrite_lowers_tables_after_the_dense_layers_and_checks_the_model():
    model = table_model()
    (table,), _ = find_tables(model)
    q = quantize_table(table, Scheme(2))
    result = rewrite(model, [], tables=[q])
    assert [k.kernel for k in result.kernels] == ["Gather+Mul"]
    ids = np.array([[3, 4]], np.int64)
    expected = q.codes.dequantize().astype(np.float32)[ids] @ numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_allclose(run(result.model, ids, LEVELS[2]), expected, rtol=1e-5, atol=1e-5)


def test_a_table_quantized_in_runs_of_rows_is_the_same(monkeypatch):
    """Row runs bound the memory of a large table's passes; they change no code, scale or error."""
    (table,), _ = find_tables(table_model(vocab=40, width=30))
    scheme = Scheme(3, Granularity.BLOCK, 16, False)
    whole = quantize_table(table, scheme)
    monkeypatch.setattr(gather, "TABLE_ROWS", 7)  # 40 rows: six runs, the last one short
    runs_of_rows = quantize_table(table, scheme)
    np.testing.assert_array_equal(runs_of_rows.codes.integers, whole.codes.integers)
    np.testing.assert_array_equal(runs_of_rows.codes.scales.scale, whole.codes.scales.scale)
    np.testing.assert_array_equal(runs_of_rows.codes.scales.zero_point, whole.codes.scales.zero_point)
    assert runs_of_rows.mean_squared_error == pytest.approx(whole.mean_squared_error, rel=1e-12)
    expected = ((whole.codes.dequantize() - table.table) ** 2).sum() / len(table.table)
    assert whole.mean_squared_error == pytest.approx(expected, rel=1e-12)
