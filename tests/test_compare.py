"""onnx-qubo compare: every configuration evaluated, the cost-accuracy study, outputs, plots."""

import json
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnx_qubo
from onnx_qubo import QuboInputError
from onnx_qubo.cli import main
from onnx_qubo.studies.compare import Comparison, CostSample

from graphs import mlp_model


def data(seed=0, n=200):
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


@pytest.mark.slow
def test_compare_evaluates_every_configuration_and_samples_costs():
    model = mlp_model(widths=(8, 16, 4))
    result = onnx_qubo.compare(model, calibration={"x": data()}, evaluation={"x": data(1)},
                               bits=(8, 2), scales=("minmax", "mse"), solvers=("rtn", "fast"), samples=6)
    assert [(r.bits, r.scale, r.solver) for r in result.rows] == [
        (b, s, m) for b in (8, 2) for s in ("minmax", "mse") for m in ("rtn", "fast")]
    assert result.metric == "top-1 agreement" and result.float_accuracy == 1.0
    for r in result.rows:
        assert 0 <= r.accuracy <= 1 and r.size_bytes > 0 and r.qubo_cost >= 0
    for bits in (8, 2):  # the QUBO solver's cost never exceeds round-to-nearest's
        for scale in ("minmax", "mse"):
            rtn, fast = (next(r for r in result.rows if (r.bits, r.scale, r.solver) == (bits, scale, m))
                         for m in ("rtn", "fast"))
            assert fast.qubo_cost <= rtn.qubo_cost * (1 + 1e-9)
    assert len(result.samples) == 12
    unperturbed = [s for s in result.samples if s.flip_rate == 0.0]
    best2 = min(r.qubo_cost for r in result.rows if r.bits == 2 and r.solver == "fast")
    assert any(s.bits == 2 and s.qubo_cost == pytest.approx(best2) for s in unperturbed)
    assert set(result.correlations()) == {8, 2}


def test_correlation_is_pearson_per_bit_width():
    c = Comparison("m", "accuracy", 0.9, 100, 10, "weights per channel")
    c.samples = [CostSample(2, 0.0, cost, acc) for cost, acc in ((1, 0.9), (2, 0.8), (3, 0.75), (4, 0.6))]
    c.samples += [CostSample(8, 0.0, cost, 0.9) for cost in (1, 2, 3)]
    r = c.correlations()
    assert r[2] == pytest.approx(np.corrcoef([1, 2, 3, 4], [0.9, 0.8, 0.75, 0.6])[0, 1])
    assert r[8] is None  # constant accuracy: undefined
    assert "n/a (constant)" in c.to_markdown()


@pytest.mark.slow
def test_cli_compare_writes_json_markdown_and_plots(tmp_path):
    onnx.save(mlp_model(widths=(8, 16, 4)), tmp_path / "m.onnx")
    x = data()
    labels = np.random.default_rng(2).integers(0, 4, len(x))
    np.savez(tmp_path / "m.calib.npz", x=x)
    np.savez(tmp_path / "e.npz", x=x, labels=labels)
    result = CliRunner().invoke(main, [
        "compare", str(tmp_path / "m.onnx"), "--eval", str(tmp_path / "e.npz"), "--bits", "4,2",
        "--samples", "4", "--json", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md"),
        "--plots", str(tmp_path / "plots"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "| bits | scale | solver | accuracy |" in result.output
    report = json.loads((tmp_path / "c.json").read_text())
    assert len(report["rows"]) == 8 and set(report["correlations"]) == {"4", "2"}
    assert (tmp_path / "c.md").read_text().startswith("Model `m.onnx`")
    for png in ("accuracy_vs_bits.png", "cost_vs_accuracy.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_compare_bad_flags(tmp_path):
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "m.calib.npz", x=data())
    for flags, message in ((["--bits", "2,x"], "comma-separated integers"),
                           (["--solvers", "fast,magic"], "choose from"),
                           (["--bits", "9"], "bits must be between 1 and 8")):
        result = CliRunner().invoke(main, ["compare", str(tmp_path / "m.onnx"), *flags])
        assert result.exit_code != 0 and message in result.output


def test_plots_without_matplotlib_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "m.calib.npz", x=data())
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "m.onnx"), "--plots", str(tmp_path / "p")])
    assert result.exit_code == 1 and "pip install 'onnx-qubo[plot]'" in result.output


@pytest.mark.slow
def test_compare_under_a_scheme_and_its_flag_errors(tmp_path):
    model = mlp_model(widths=(8, 6, 4))
    result = onnx_qubo.compare(model, calibration={"x": data()}, bits=(4, 2), scales=("mse",),
                               granularity="block", block_size=4, symmetric=False, activations="uint8",
                               sequential=True)
    assert len(result.rows) == 4 and "blocks of 4 inputs, asymmetric" in result.to_markdown()  # 2 bits x 2 solvers
    with pytest.raises(QuboInputError, match="onnxruntime 1.32 fuses"):
        onnx_qubo.compare(model, calibration={"x": data()}, bits=(4, 2), symmetric=False, activations="uint8")


def test_json_and_markdown_may_not_be_the_same_file(tmp_path):
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "m.calib.npz", x=np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "r.txt"),
                                       "--markdown", str(tmp_path / "r.txt"), "--quiet"])
    assert result.exit_code == 2 and "name the same file" in result.output
    assert not (tmp_path / "r.txt").exists()


def test_plots_may_not_replace_a_file_the_run_reads(tmp_path):
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    calibration = tmp_path / "accuracy_vs_bits.png"  # an .npz archive under a plot's name
    with open(calibration, "wb") as out:
        np.savez(out, x=np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    before = calibration.read_bytes()
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "m.onnx"), "--calib", str(calibration),
                                       "--plots", str(tmp_path), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert result.exit_code == 1 and "is a data file this run reads" in result.output
    assert calibration.read_bytes() == before and not (tmp_path / "r.json").exists()
