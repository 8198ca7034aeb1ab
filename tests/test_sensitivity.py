"""Per-layer contribution (``onnx-qubo sensitivity``) and the automatic choices built on it
(``--auto-scheme``, ``--size-budget``, ``--max-error``)."""

import json

import numpy as np
import onnx
import pytest
import runs
from click.testing import CliRunner
from onnx import numpy_helper

import onnx_qubo
from onnx_qubo.autoscheme import Candidate, greedy
from onnx_qubo.cli import main
from onnx_qubo.core.errors import OptionError
from onnx_qubo.studies.contribution import LayerSensitivity

from graphs import mlp_model

WIDTHS = (12, 10, 8, 6)


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    return ({"x": rng.standard_normal((96, WIDTHS[0])).astype(np.float32)},
            {"x": rng.standard_normal((64, WIDTHS[0])).astype(np.float32)})


@pytest.mark.slow
def test_each_layer_alone_equals_quantize_with_the_others_excluded(tmp_path, data):
    """The oracle: quantize's own evaluation of the model with every other layer left float."""
    calib, evaluation = data
    model = mlp_model(WIDTHS)
    result = onnx_qubo.sensitivity(model, calibration=calib, evaluation=evaluation, bits=2)
    names = [s.name for s in result.layers]
    assert sorted(names) == ["fc0", "fc1", "fc2"]
    for s in result.layers:
        others = [n for n in names if n != s.name]
        report = runs.quantize(model, tmp_path / f"{s.name}.onnx", bits=2, calibration=calib,
                                    evaluation=evaluation, exclude=others, speed=False)
        assert s.output_error == pytest.approx(report.evaluation.relative_output_error, rel=1e-6)
        assert s.top1_agreement == pytest.approx(report.evaluation.top1_agreement)
        assert s.cost == pytest.approx(report.layers[0].final_cost)
        assert s.output_error > 0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.slow
def test_stored_bytes_are_the_written_integer_scale_and_zero_point_tensors(tmp_path, data, symmetric):
    calib, evaluation = data
    model = mlp_model(WIDTHS)
    result = onnx_qubo.sensitivity(model, calibration=calib, evaluation=evaluation, bits=4,
                                   granularity="block", block_size=4, symmetric=symmetric)
    runs.quantize(model, tmp_path / "q.onnx", bits=4, calibration=calib, granularity="block", block_size=4,
                       symmetric=symmetric, speed=False)
    written = {i.name: i for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    for s in result.layers:
        weight = f"W{s.name[-1]}"
        parts = [t for name, t in written.items() if name.startswith(weight + "_")]
        assert len(parts) == (2 if symmetric else 3)
        assert s.weight_bytes == sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in parts)
        assert s.float_bytes == 4 * np.prod(numpy_helper.to_array(next(
            i for i in model.graph.initializer if i.name == weight)).shape)


def _candidates(errors_bytes):
    """Layers as lists of (error, bytes) candidates, the last one float (error 0)."""
    out = []
    for k, options in enumerate(errors_bytes):
        out.append([Candidate(None, None, LayerSensitivity(f"l{k}", "Gemm", 4, "x", e, 1.0, b, 1000, 0.0), e, b)
                     for e, b in options])
    return out


def test_greedy_takes_the_most_error_removed_per_byte_within_the_budget():
    cands = _candidates([[(0.3, 100), (0.05, 200), (0.0, 800)],  # 0.0875 per 100 bytes to 8 bits
                         [(0.1, 100), (0.01, 200), (0.0, 800)],  # 0.0099 per 100 bytes
                         [(0.2, 100), (0.02, 200), (0.0, 800)]])
    choice = greedy(cands, size_budget=1000 + 300 + 200, max_error=None, base_bytes=1000)
    assert [c.bytes for c in choice.chosen] == [200, 100, 200]  # the two best upgrades fit, the third does not
    assert choice.weight_bytes == 500
    assert choice.estimated_error == pytest.approx(np.sqrt(0.05 ** 2 + 0.1 ** 2 + 0.02 ** 2))


def test_greedy_stops_once_the_error_estimate_is_met():
    cands = _candidates([[(0.3, 100), (0.05, 200), (0.0, 800)], [(0.1, 100), (0.01, 200), (0.0, 800)]])
    choice = greedy(cands, size_budget=None, max_error=0.12, base_bytes=0)
    assert [c.bytes for c in choice.chosen] == [200, 100]
    assert choice.estimated_error <= 0.12


def test_greedy_refuses_a_budget_below_the_smallest_model():
    cands = _candidates([[(0.3, 100), (0.0, 800)]])
    with pytest.raises(OptionError, match="size_budget"):
        greedy(cands, size_budget=1050, max_error=None, base_bytes=1000)


@pytest.mark.slow
def test_size_budget_keeps_the_model_within_it_and_at_most_the_error_of_the_smallest(tmp_path, data):
    calib, evaluation = data
    model = mlp_model(WIDTHS)
    small = runs.quantize(model, tmp_path / "small.onnx", bits=2, calibration=calib, evaluation=evaluation,
                               speed=False)
    budget = (small.output_bytes + 150) / 1e6
    report = runs.quantize(model, tmp_path / "auto.onnx", bits=2, calibration=calib, evaluation=evaluation,
                                size_budget=budget, speed=False)
    assert report.output_bytes <= budget * 1e6 + 400  # the estimate leaves out node and name bytes
    assert report.output_bytes > small.output_bytes  # some layer was given more bits or kept float
    assert report.evaluation.relative_output_error < small.evaluation.relative_output_error
    assert any("automatic choice" in note for note in report.notes)


@pytest.mark.slow
def test_bits_per_weight_target_mixes_widths_within_it(tmp_path, data):
    """One bit per weight above what 2-bit codes store (scales included): some layers get more
    bits, the written codes, scales and zero points stay within the target, and the output error
    drops below plain 2 bits'."""
    calib, evaluation = data
    model = mlp_model(WIDTHS)
    weights = {f"W{k}" for k in range(3)}
    count = sum(numpy_helper.to_array(i).size for i in model.graph.initializer if i.name in weights)

    def bits_per_weight(path):  # codes (packed), scales and zero points of the three weights
        return 8 * sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes
                       for t in onnx.load(path).graph.initializer if t.name.split("_")[0] in weights) / count

    plain = runs.quantize(model, tmp_path / "plain.onnx", bits=2, calibration=calib, evaluation=evaluation,
                          speed=False)
    target = bits_per_weight(tmp_path / "plain.onnx") + 1.0
    report = runs.quantize(model, tmp_path / "auto.onnx", bits=2, bits_per_weight=target, calibration=calib,
                           evaluation=evaluation, speed=False)
    assert bits_per_weight(tmp_path / "plain.onnx") < bits_per_weight(tmp_path / "auto.onnx") <= target
    assert sorted({layer.bits for layer in report.layers}) != [2]
    assert report.evaluation.relative_output_error < plain.evaluation.relative_output_error
    assert "bits per weight" in next(note for note in report.notes if "automatic choice" in note)
    with pytest.raises(OptionError, match="below what these schemes store at least"):
        runs.quantize(model, tmp_path / "low.onnx", bits=2, bits_per_weight=target - 1.5, calibration=calib,
                      speed=False)


@pytest.mark.slow
def test_auto_scheme_gives_each_layer_the_scheme_of_least_error_on_the_calibration_data(tmp_path, data):
    calib, evaluation = data
    model = mlp_model(WIDTHS)
    report = runs.quantize(model, tmp_path / "auto.onnx", bits=2, calibration=calib, evaluation=evaluation,
                                auto_scheme=True, speed=False)
    errors = {}  # (layer, asymmetric) -> least error over per channel and blocks of 32
    for granularity, size in (("channel", 0), ("block", 32)):
        for symmetric in (True, False):
            result = onnx_qubo.sensitivity(model, calibration=calib, evaluation=calib, bits=2,
                                           granularity=granularity, block_size=size, symmetric=symmetric)
            for s in result.layers:
                key = (s.name, not symmetric)
                errors[key] = min(errors.get(key, np.inf), s.output_error)
    for layer in report.layers:
        asymmetric = errors[(layer.name, True)] < errors[(layer.name, False)]
        assert layer.storage == ("UINT2" if asymmetric else "INT2")
    assert "2 bits" in next(note for note in report.notes if "automatic choice" in note)


@pytest.mark.slow
def test_max_error_no_layer_can_meet_is_refused(tmp_path, data):
    calib, evaluation = data
    with pytest.raises(OptionError, match="max_error"):
        runs.quantize(mlp_model(WIDTHS), tmp_path / "q.onnx", bits=2, calibration=calib, max_error=1e-12,
                           speed=False)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("kwargs, names", [
    (dict(size_budget=1.0, sequential=True), "sequential"),
    (dict(max_error=0.1, layer_bits={"fc0": 8}), "layer_bits"),
    (dict(size_budget=-1.0), "size_budget"),
    (dict(max_error=float("nan")), "max_error"),
    (dict(bits_per_weight=2.5, size_budget=1.0), "bits_per_weight"),
    (dict(bits_per_weight=0.0), "bits_per_weight"),
    (dict(auto_scheme=True, format="ort", bits=4), "format"),
])
def test_automatic_option_errors(tmp_path, data, kwargs, names):
    calib, _ = data
    with pytest.raises(OptionError, match=names):
        runs.quantize(mlp_model(WIDTHS), tmp_path / "q.onnx", calibration=calib, speed=False,
                           **{"bits": 2, **kwargs})
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
def test_cli_sensitivity_table_and_json(tmp_path, data):
    calib, evaluation = data
    onnx.save(mlp_model(WIDTHS), tmp_path / "m.onnx")
    np.savez(tmp_path / "m.calib.npz", **calib)
    np.savez(tmp_path / "m.eval.npz", **evaluation)
    result = CliRunner().invoke(main, ["sensitivity", str(tmp_path / "m.onnx"), "--bits", "2", "--quiet",
                                       "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| fc")]
    errors = [float(line.split("|")[5]) for line in rows]
    assert len(rows) == 3 and errors == sorted(errors, reverse=True)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert {layer["name"] for layer in saved["layers"]} == {"fc0", "fc1", "fc2"}


def test_cli_flags_named_in_errors(tmp_path, data):
    calib, _ = data
    onnx.save(mlp_model(WIDTHS), tmp_path / "m.onnx")
    np.savez(tmp_path / "m.calib.npz", **calib)
    result = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--size-budget", "1",
                                       "--sequential", "--quiet"])
    assert result.exit_code == 1
    assert "--size-budget" in result.output and "--sequential" in result.output
    result = CliRunner().invoke(main, ["sensitivity", str(tmp_path / "m.onnx"), "--sequential"])
    assert result.exit_code == 2
    assert not (tmp_path / "o.onnx").exists()
