"""Padded positions (onnx_qubo/calibration/padding.py): where the calibration data marks them
(``attention_mask``, or the input ``--padding-mask`` names), the layers whose inputs are per
position leave them out of their statistics, exactly as if those rows had not been there; a
layer after pooling (or on a time-major input) keeps every row; the rounding then fits the
positions that reach the output, and an output that is per position is measured on them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import runs

from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.calibration.grams import ConvGram, DenseGram, RecurrentGram
from onnx_qubo.calibration.padding import padded_share, with_padding_mask
from onnx_qubo.core.errors import OptionError
from onnx_qubo.core.progress import Progress
from onnx_qubo.core.views import ConvGeometry
from onnx_qubo.pipeline import calibrate

from graphs import masked_model, matmul_model


def padded_data(seed: int, count: int = 48, length: int = 6, f: int = 8, garbage: float = 30.0) -> dict:
    """Sequences of 2 to ``length`` positions padded to ``length``; the pads' inputs are large
    values no real position has (what a pad's hidden state may be, and never reaches the output)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, length + 1, count)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    x = rng.standard_normal((count, length, f)).astype(np.float32)
    x[mask == 0] = garbage * rng.standard_normal((int((mask == 0).sum()), f)).astype(np.float32)
    return {"x": x, "attention_mask": mask}


def test_a_masked_gram_is_the_gram_of_the_kept_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 6))
    seen = x + 0.1 * rng.standard_normal(x.shape)
    mask = (rng.random((4, 5)) < 0.6).astype(np.int64)
    mask[:, 0] = 1  # every sample keeps a row
    masked = DenseGram(6, True, True)
    masked.update(x, seen, 4, mask)
    kept = DenseGram(6, True, True)
    for t in range(4):
        kept.update(x[t][mask[t] == 1], seen[t][mask[t] == 1], 1)
    got, want = masked.statistics(), kept.statistics()
    assert got.count == want.count == mask.sum()
    for a, b in ((got.gram, want.gram), (got.cross, want.cross), (got.drift, want.drift)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert got.spread == pytest.approx(want.spread, rel=1e-5)  # float32 products


def test_a_mask_that_does_not_cover_the_vectors_is_refused():
    with pytest.raises(ValueError, match="does not cover"):
        DenseGram(6, False).update(np.zeros((2, 3, 6)), mask=np.ones((2, 4)))
    geometry = ConvGeometry.from_attributes({}, (4, 2, 3, 3), 2)
    for accumulator in (ConvGram(geometry, False, "conv"), RecurrentGram(6, 1, False)):
        with pytest.raises(ValueError, match="no padding mask"):
            accumulator.update(np.zeros((1, 2, 6)), mask=np.ones((1, 2)))


def test_auto_finds_attention_mask_and_the_positions_layer_leaves_the_pads_out():
    model, data = masked_model(), padded_data(1)
    dataset = with_padding_mask(load_dataset(data, model, batch_size=20), model)
    assert dataset.padding_mask == "attention_mask"
    assert padded_share(dataset, "attention_mask") == pytest.approx(1 - data["attention_mask"].mean())
    calibrated = calibrate(model, dataset, Progress(enabled=False))
    layers = {layer.name: layer for layer in calibrated.layers}
    positions = calibrated.statistics[layers["positions"].statistics_key]
    real = data["x"][data["attention_mask"] == 1].astype(np.float64)
    z = np.hstack([real, np.ones((len(real), 1))])
    assert positions.count == len(real)
    np.testing.assert_allclose(positions.gram, z.T @ z / len(real), rtol=1e-10)
    pooled = calibrated.statistics[layers["pooled_dense"].statistics_key]
    assert pooled.count == len(data["x"])  # one row per sample: not per position, nothing left out


def test_auto_finds_tensorflow_berts_input_mask_too():
    data = padded_data(7)
    data["input_mask:0"] = data.pop("attention_mask")
    model = masked_model(mask="input_mask:0")
    assert with_padding_mask(load_dataset(data, model), model).padding_mask == "input_mask:0"


def test_a_time_major_input_keeps_every_row_even_where_the_mask_is_square():
    """Batches of as many sequences as positions: a [S, B, f] input has the mask's shape; the
    first non-square piece (calibration's one-sample probe) shows it is not per position."""
    model, data = masked_model(time_major=True), padded_data(6)
    dataset = with_padding_mask(load_dataset(data, model, batch_size=6), model)
    assert dataset.padding_mask == "attention_mask" and all(b["x"].shape[:2] == (6, 6) for b in dataset.batches)
    calibrated = calibrate(model, dataset, Progress(enabled=False))
    layer = next(layer for layer in calibrated.layers if layer.name == "positions")
    assert calibrated.statistics[layer.statistics_key].count == data["x"].shape[0] * data["x"].shape[1]


@pytest.mark.parametrize("option", ["none", "auto"])
def test_none_and_models_without_a_mask_count_every_position(option):
    data = padded_data(2)
    model = masked_model()
    if option == "auto":  # a model without attention_mask: nothing to find
        model, data = matmul_model(f=8, leading=("S",)), {"x": data["x"]}
    dataset = with_padding_mask(load_dataset(data, model), model, option)
    assert dataset.padding_mask is None
    calibrated = calibrate(model, dataset, Progress(enabled=False))
    layer = calibrated.layers[0]
    assert calibrated.statistics[layer.statistics_key].count == data["x"].shape[0] * data["x"].shape[1]


def test_quantizing_for_the_positions_that_reach_the_output(tmp_path):
    """The pads' large inputs dominate a Gram matrix that counts them: the rounding fitted to
    them leaves a larger error on held-out data than the one fitted to the real positions."""
    model = masked_model()
    runs_of = {option: runs.quantize(model, tmp_path / f"{option}.onnx", calibration=padded_data(3),
                                     evaluation=padded_data(4), bits=2, speed=False, padding_mask=option)
               for option in ("auto", "none")}
    assert any("padded positions (attention_mask = 0" in note for note in runs_of["auto"].notes)
    assert not any("padded positions" in note for note in runs_of["none"].notes)
    auto, none = (runs_of[o].evaluation.relative_output_error for o in ("auto", "none"))
    assert auto < 0.8 * none


def test_per_position_scores_are_measured_on_the_positions_kept(tmp_path):
    """A token classifier's scores at its pads are computed but ignored: the report's measures
    (checked here against numpy on onnxruntime's outputs) leave them out, as calibration does."""
    model, evaluation = masked_model(per_position=True), padded_data(9)
    report = runs.quantize(model, tmp_path / "q.onnx", calibration=padded_data(8), evaluation=evaluation, bits=2,
                           speed=False)
    kept = evaluation["attention_mask"] == 1
    assert report.evaluation.positions == (int(kept.sum()), kept.size)
    assert "positions the padding mask keeps" in report.to_text()

    def scores(path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, evaluation)[0][kept].astype(np.float64)

    onnx.save(model, tmp_path / "float.onnx")
    y_float, y_quant = scores(tmp_path / "float.onnx"), scores(tmp_path / "q.onnx")
    assert report.evaluation.relative_output_error == pytest.approx(
        np.linalg.norm(y_quant - y_float) / np.linalg.norm(y_float), rel=1e-6)
    assert report.evaluation.top1_agreement == pytest.approx(np.mean(y_quant.argmax(-1) == y_float.argmax(-1)))
    assert report.evaluation.samples == len(evaluation["x"])


@pytest.mark.parametrize("option, message", [
    ("mask", "'mask' is not an input of the model"),
    ("x", "'x' is not a \\[batch, sequence\\] mask: its array in the calibration data has shape \\[48, 6, 8\\]"),
])
def test_a_padding_mask_that_is_not_one_is_refused(option, message):
    model = masked_model()
    with pytest.raises(OptionError, match=message) as caught:
        with_padding_mask(load_dataset(padded_data(5), model), model, option)
    assert caught.value.options == ("padding_mask",)
