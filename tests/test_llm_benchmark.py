"""benchmarks/llm.py end to end on models/tiny_lm (float and an onnx-qubo cell, perplexity, bits per
weight, og speed, the table), and its cell names."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_qubo import api
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.passes import packed_codes

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny_lm"
_spec = importlib.util.spec_from_file_location("llm_bench", ROOT / "benchmarks" / "llm.py")
assert _spec is not None and _spec.loader is not None
llm = importlib.util.module_from_spec(_spec)
sys.modules["llm_bench"] = llm
_spec.loader.exec_module(llm)


def test_cell_names_round_trip_and_bad_names_are_refused():
    for name in ("float", "builder:4:128", "rtn:2:32", "ours:4:32:acc0", "float:torch", "ours:2:32:torch",
                 "ours:2:32:qdq"):
        assert llm.Cell.parse(name).name == name
    assert llm.Cell.parse("rtn:3:32").unsupported()
    assert llm.Cell.parse("ours:3:32").unsupported() is None
    assert llm.Cell.parse("rtn:4:32:torch").source == llm.Cell.parse("float:torch")
    for bad in ("float:4:32", "ours:4", "awq:4:32", "rtn:4:32:acc0", "builder:4:32:torch", "gptq:4:32:torch"):
        with pytest.raises(SystemExit):
            llm.Cell.parse(bad)


def test_spread_windows_do_not_overlap_and_cover_the_span():
    windows = llm.spread_windows(np.arange(1000), 4, 100)
    assert windows.shape == (4, 100) and windows[0, 0] == 0 and windows[-1, -1] == 999
    assert len(np.unique(windows)) == windows.size
    with pytest.raises(SystemExit):
        llm.spread_windows(np.arange(300), 4, 100)


def test_float_bits_per_weight_count_the_tied_table_once():
    bits = llm.weight_bits(TINY)
    assert bits["blocks"]["bits_per_weight"] == 32 and bits["lm_head"]["bits_per_weight"] == 32
    assert bits["blocks"]["weights"] == 2 * 64 * (128 + 64 + 128 + 128 + 128)  # qkv, o, gate, up, down
    assert bits["embedding"]["bytes"] == 0 and bits["embedding_form"] == "Gather (shared with the head)"


@pytest.mark.slow
def test_tiny_model_end_to_end(tmp_path):
    args = ["--work", str(tmp_path / "work"), "--float-folder", str(TINY), "--calib", str(TINY / "model.calib.npz"),
            "--eval", str(TINY / "model.eval.npz")]
    llm.main([*args, "--only", "float,ours:4:32,rtn:3:32,ours:2:32:qdq", "--speed", "float,ours:4:32", "--repeat", "1",
              "--new", "4", "--table", "--out", str(tmp_path / "llm")])
    cells = {d["cell"]: d for d in json.loads((tmp_path / "llm.json").read_text())["cells"]}
    assert set(cells) == {"float", "ours:4:32", "ours:2:32:qdq"}  # rtn:3:32 has no quantizer: not run
    ours = cells["ours:4:32"]
    # one perplexity function for every cell, and it agrees with onnx-qubo's own streamed evaluation
    assert ours["perplexity"] == pytest.approx(ours["make"]["report"]["quantized_perplexity"], rel=1e-6)
    assert cells["float"]["perplexity"] == pytest.approx(ours["make"]["report"]["float_perplexity"], rel=1e-6)
    # 4-bit codes + one float32 scale per 32 weights, + a 4-bit zero point per 32 on the layers whose grid is
    # the asymmetric one (each layer's choice), read back from the written MatMulNBits nodes
    graph = onnx.load(str(tmp_path / "work" / "models" / "ours_4_32" / "model.onnx"), load_external_data=False).graph
    blocks = {"weights": 0, "zero_points": 0}
    for node in graph.node:
        sizes = {a.name: a.i for a in node.attribute}
        if node.op_type == "MatMulNBits" and sizes["N"] != 512:  # not the head (vocabulary 512)
            blocks["weights"] += sizes["K"] * sizes["N"]
            blocks["zero_points"] += sizes["K"] * sizes["N"] * (len(node.input) > 3 and bool(node.input[3]))
    assert ours["weights"]["blocks"]["bits_per_weight"] == pytest.approx(5.0 + 0.125 * blocks["zero_points"]
                                                                         / blocks["weights"])
    assert ours["weights"]["embedding_form"] == "GatherBlockQuantized"
    # every byte of blocks, head and table (each 5 bits a weight, 5.125 with zero points) over the blocks' and
    # the head's 106,496 weights
    with_table = 1 + 64 * 512 / 106496
    assert 5.0 * with_table <= ours["weights"]["overall_bits_per_weight"] <= 5.125 * with_table
    assert ours["make"]["exit_status"] == 0 and ours["make"]["peak_rss_mb"] > 0
    speed = json.loads((tmp_path / "work" / "speed.json").read_text())["models"]
    assert speed["ours:4:32"]["decode_tok_s"] > 0 and speed["float"]["prefill_tok_s"] > 0
    table = (tmp_path / "llm.md").read_text()
    assert "| ours:4:32 |" in table and "og.Generator speed" in table
    # the size-versus-perplexity section: the quantized cell at its MatMuls' bits per weight, on its front
    matmuls = ours["weights"]["matmul_bits_per_weight"]
    assert 5.0 <= matmuls <= 5.125
    assert f"| {matmuls:.3f} | onnx-qubo | ours:4:32 | {ours['perplexity']:.3f} |" in table
    assert (tmp_path / "llm_curve.png").stat().st_size > 0
    # --format qdq: 2-bit codes at their size (4 to a byte), the head (a Gemm reading [N, K] codes; 4-bit
    # codes, --head-bits' default below 4) and the table gathered by rows (codes, scales, zero points: one
    # table) each counted once
    qdq = cells["ours:2:32:qdq"]["weights"]
    assert 3.0 <= qdq["blocks"]["bits_per_weight"] <= 3.0625 and 5.0 <= qdq["lm_head"]["bits_per_weight"] <= 5.125
    assert qdq["embedding"]["weights"] == 512 * 64 and qdq["lm_head"]["weights"] == 512 * 64


@pytest.mark.slow
def test_torch_cells_start_from_the_export_and_compare_with_it(tmp_path):
    """A :torch cell quantizes the torch export (here a given one: the tiny model without its genai
    files, as the export has none) and its increase is over the export's own perplexity."""
    work = tmp_path / "work"
    export = work / "models" / "float_torch"
    export.mkdir(parents=True)
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(TINY / name, export)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"vocab_size": 512, "hidden_size": 64}))
    llm.main(["--work", str(work), "--hf", str(hf), "--calib", str(TINY / "model.calib.npz"),
              "--eval", str(TINY / "model.eval.npz"), "--only", "float:torch,ours:4:32:torch", "--table",
              "--out", str(tmp_path / "llm")])
    cells = {d["cell"]: d for d in json.loads((tmp_path / "llm.json").read_text())["cells"]}
    ours = cells["ours:4:32:torch"]
    assert ours["perplexity"] == pytest.approx(ours["make"]["report"]["quantized_perplexity"], rel=1e-6)
    assert cells["float:torch"]["perplexity"] == pytest.approx(ours["make"]["report"]["float_perplexity"], rel=1e-6)
    assert not (work / "models" / "ours_4_32_torch" / "genai_config.json").exists()
    assert ours["weights"]["embedding_form"] == "GatherBlockQuantized"
    rise = ours["perplexity"] - cells["float:torch"]["perplexity"]
    assert f"| ours:4:32:torch | {ours['perplexity']:.3f} | {rise:.3f} |" in (tmp_path / "llm.md").read_text()
    with pytest.raises(SystemExit, match="og.Generator runs the builder's graphs"):
        llm.main(["--work", str(work), "--speed", "ours:4:32:torch"])


def test_float_zero_point_offsets_count_in_the_bits_per_weight(tmp_path):
    """--float-zero-points: each block of 32 carries a float32 scale and a float32 offset beside its
    4-bit-stored codes: 6 bits per weight in the blocks, read back from the written graph."""
    out = tmp_path / "fzp"
    out.mkdir()
    config = QuantizeConfig.from_flat(bits=3, granularity="block", block_size=32, symmetric=False,
                                      float_zero_points=True)
    api.run(str(TINY / "model.onnx"), str(out / "model.onnx"), config, calibration=str(TINY / "model.calib.npz"),
            speed=False)
    bits = llm.weight_bits(out)
    assert bits["blocks"]["bits_per_weight"] == pytest.approx(6.0)
    assert bits["blocks"]["weights"] == 2 * 64 * (128 + 64 + 128 + 128 + 128)


def test_codes_packed_at_their_width_count_as_stored(tmp_path, monkeypatch):
    """3-bit codes packed at 3 bits (every layer, however small) with a float32 scale and a 4-bit
    zero point (the language model's default grid is asymmetric) per block of 32: 4.125 bits per
    weight in the blocks, read back from the planes the written graph stores."""
    monkeypatch.setattr(packed_codes, "UNPACKING_BYTES", 0)
    out = tmp_path / "packed"
    out.mkdir()
    config = QuantizeConfig.from_flat(bits=3, granularity="block", block_size=32, head_bits=3, pack_codes=True)
    api.run(str(TINY / "model.onnx"), str(out / "model.onnx"), config, calibration=str(TINY / "model.calib.npz"),
            speed=False)
    bits = llm.weight_bits(out)
    assert bits["blocks"]["bits_per_weight"] == pytest.approx(4.125)
    assert bits["blocks"]["weights"] == 2 * 64 * (128 + 64 + 128 + 128 + 128)
