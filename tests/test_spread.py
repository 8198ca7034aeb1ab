"""``--damping auto`` (onnx_qubo/calibration/spread.py): the spread of the per-sample Gram
matrices each view measures while it calibrates, checked against numpy on the samples' own Gram
matrices, and the Ledoit-Wolf ridge taken from it, which lowers a layer's error on samples the
calibration did not see where its Gram matrix is estimated from too few."""

from __future__ import annotations

import numpy as np
import pytest
import runs
from test_layer import numpy_error, statistics

from onnx_qubo.calibration import spread as spread_module
from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.calibration.grams import DenseGram
from onnx_qubo.calibration.patches import PatchGram, patches
from onnx_qubo.calibration.spread import MAX_SHRINKAGE, SampleSpread, shrinkage_damping
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.errors import OptionError
from onnx_qubo.core.progress import Progress
from onnx_qubo.core.views import ConvGeometry
from onnx_qubo.layer import LayerTerms, prepare_layer
from onnx_qubo.model.discovery import find_dense_layers
from onnx_qubo.pipeline import calibrate
from onnx_qubo.plan import make_plan

from graphs import gemm_model, mlp_model


def reference_spread(grams: list[np.ndarray]) -> float:
    """sum_t ||G_t / tr G_t - mean||_F^2 / T^2, in float64."""
    units = np.array([g / np.trace(g) for g in grams])
    return float(((units - units.mean(axis=0)) ** 2).sum() / len(units) ** 2)


def samples_of(rng: np.random.Generator, count: int, rows: int, f: int) -> np.ndarray:
    """``count`` samples of ``rows`` vectors each, every sample with its own scale and mixing."""
    return np.array([rng.uniform(0.2, 3.0) * rng.standard_normal((rows, f))
                     @ (np.eye(f) + 0.5 * rng.standard_normal((f, f))) for _ in range(count)])


@pytest.mark.parametrize("rows", [7, 2, 1])  # more rows per sample than features, fewer, one (a head)
def test_a_dense_views_spread_is_that_of_its_samples_gram_matrices(rows, monkeypatch):
    """Rows split evenly between a batch's samples, in order: the spread of those samples' Gram
    matrices (z's weight part), over batches of different sizes, however many samples' small Gram
    matrices are held at once; the Gram matrix itself is still the mean over every row."""
    monkeypatch.setattr(spread_module, "SMALL_GRAMS_BYTES", 4 * 4 * 2)  # two float32 2 x 2 Grams a time (one 5 x 5)
    rng = np.random.default_rng(0)
    f = 5
    batches = [samples_of(rng, count, rows, f) for count in (3, 1, 4)]
    accumulator = DenseGram(f, with_drift=False, spread=True)
    for batch in batches:
        accumulator.update(batch, samples=len(batch))
    result = accumulator.statistics()
    every = np.concatenate(batches)
    assert result.spread == pytest.approx(reference_spread([s.T @ s for s in every]), rel=1e-5)
    x = every.reshape(-1, f)
    np.testing.assert_allclose(result.x_gram, x.T @ x / len(x), rtol=1e-12)
    assert result.count == len(x)


def test_rows_that_do_not_split_evenly_are_one_sample_and_one_sample_has_no_spread():
    rng = np.random.default_rng(1)
    accumulator = DenseGram(4, with_drift=False, spread=True)
    accumulator.update(rng.standard_normal((5, 4)), samples=2)
    accumulator.update(np.zeros((0, 4)), samples=3)  # a batch in which the layer did not run: no sample
    assert accumulator.spread is not None and accumulator.spread.samples[0] == 1
    assert accumulator.statistics().spread == 0.0
    two = DenseGram(4, with_drift=False, spread=True)
    for _ in range(2):
        two.update(rng.standard_normal((5, 4)), samples=1)
    assert two.statistics().spread is not None and two.statistics().spread > 0


def test_the_spread_is_measured_only_when_asked_and_the_gram_matrix_does_not_need_it():
    """Without ``spread`` (damping other than auto) nothing is measured; the Gram matrix has the
    same bits either way."""
    rng = np.random.default_rng(7)
    x = samples_of(rng, 6, 5, 4)
    sums = {}
    for measured in (False, True):
        sums[measured] = DenseGram(4, with_drift=False, spread=measured)
        sums[measured].update(x, samples=len(x))
    assert sums[False].spread is None and sums[False].statistics().spread is None
    np.testing.assert_array_equal(sums[True].statistics().gram, sums[False].statistics().gram)
    geometry = ConvGeometry.from_attributes({"group": 1}, (2, 3, 2, 2), 3)
    conv = PatchGram(geometry)
    conv.update(rng.standard_normal((3, 3, 5, 5)))
    assert conv.spread is None and conv.result().spread is None and conv.result().group(0).spread is None


def test_a_convs_spread_is_per_image_and_per_group():
    """Each image's patches make one sample of each group's spread."""
    rng = np.random.default_rng(2)
    geometry = ConvGeometry.from_attributes({"group": 2, "pads": [1, 1, 1, 1]}, (4, 2, 3, 3), 4)
    images = rng.standard_normal((5, 4, 6, 7)) * rng.uniform(0.2, 3.0, (5, 1, 1, 1))
    accumulator = PatchGram(geometry, spread=True, max_bytes=8 * geometry.features * 2 * 9)  # chunks split images
    accumulator.update(images[:2])
    accumulator.update(images[2:])
    result = accumulator.result()
    assert result.spread is not None
    for g in range(2):
        grams = [p[g].T @ p[g] for p in (patches(images[k:k + 1], geometry) for k in range(5))]
        assert result.spread[g] == pytest.approx(reference_spread(grams), rel=1e-5)
        assert result.group(g).spread == pytest.approx(float(result.spread[g]))


def test_a_sample_of_zeros_is_not_counted():
    sums = SampleSpread(3, groups=2)
    grams = np.stack([np.eye(3), np.zeros((3, 3))])
    sums.add(grams)
    sums.add(2 * grams)
    assert list(sums.samples) == [2, 0]
    result = sums.spread()
    assert result[0] == pytest.approx(0.0, abs=1e-12) and result[1] == 0.0  # one sample: none measured


def test_the_shrinkage_is_ledoit_and_wolfs_intensity_as_a_ridge():
    """delta = spread / ||G/tr G - I/f||^2, the ridge delta / (1 - delta) of the mean diagonal;
    none without a spread, capped near 1."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 6))
    objective = a @ a.T + np.eye(6)
    unit = objective / np.trace(objective)
    delta = 1e-3 / ((unit - np.eye(6) / 6) ** 2).sum()
    assert shrinkage_damping(1e-3, objective) == pytest.approx(delta / (1 - delta), rel=1e-12)
    assert shrinkage_damping(1e-3, 7 * objective) == pytest.approx(delta / (1 - delta), rel=1e-12)
    assert shrinkage_damping(0.0, objective) == 0.0
    assert shrinkage_damping(1e6, objective) == pytest.approx(MAX_SHRINKAGE / (1 - MAX_SHRINKAGE))


def held_out_cost(damping: object, x: np.ndarray, unseen: np.ndarray, samples: int) -> tuple[float, float]:
    """A layer's scales and rounding from ``x`` (``samples`` samples of its rows) at ``damping``:
    its ridge and its output error on ``unseen``, in numpy."""
    layer = find_dense_layers(gemm_model(f=x.shape[1], n=6, trans_b=1, alpha=1.0, beta=1.0, relu=False, seed=4))[0][0]
    accumulator = DenseGram(x.shape[1], with_drift=False, spread=True)
    accumulator.update(x, samples=samples)
    stats = accumulator.statistics()
    plan = make_plan(QuantizeConfig.from_flat(bits=2, solver="fast", damping=damping), [layer]).layers[0]
    work = prepare_layer(plan, stats, None)
    solved = work.finish(work.solve(Progress()), 0.0)
    q = solved.quantized()
    shift = 0.0 if q.bias_shift is None else q.bias_shift
    assert solved.report.final_cost == pytest.approx(numpy_error(layer, q.codes.dequantize(), x, x, layer.bias + shift),
                                                     rel=1e-9)  # the report: the undamped error
    return work.terms.ridge, numpy_error(layer, q.codes.dequantize(), unseen, unseen, layer.bias + shift)


def test_auto_damping_lowers_the_error_on_unseen_samples_where_the_gram_is_estimated_from_too_few():
    """24 inputs, 6 samples of 3 rows (a Gram of rank 18): the exact rounding fits the sample's
    noise, and the automatic ridge gives a lower error on 4000 unseen rows; with 4000 samples the
    ridge is almost none."""
    rng = np.random.default_rng(5)
    f = 24
    mixing = np.eye(f) + 0.3 * rng.standard_normal((f, f))
    unseen = rng.standard_normal((4000, f)) @ mixing
    few = rng.standard_normal((18, f)) @ mixing
    ridge, auto = held_out_cost("auto", few, unseen, samples=6)
    _, undamped = held_out_cost(0.0, few, unseen, samples=6)
    assert ridge > 0.05
    assert auto < undamped
    many, _ = held_out_cost("auto", rng.standard_normal((4000, f)) @ mixing, unseen, samples=4000)
    assert many < 0.01


def test_damping_takes_auto_in_any_case_and_refuses_other_words():
    assert QuantizeConfig.from_flat(damping="Auto").rounding.damping == "auto"
    assert "spread" in QuantizeConfig.from_flat(damping="auto").describe()
    with pytest.raises(OptionError, match="damping"):
        QuantizeConfig.from_flat(damping="some")


def test_layer_terms_without_auto_keep_the_damping_given_and_auto_needs_a_measured_spread():
    layer = find_dense_layers(gemm_model(f=9, n=4, trans_b=1, alpha=0.5, beta=2.0, relu=False))[0][0]
    x = np.random.default_rng(6).standard_normal((50, 9))
    assert LayerTerms(layer, statistics(x), False, layer.weight, damping=0.25).ridge == 0.25
    with pytest.raises(ValueError, match="spread"):  # calibrated without it: a caller's bug, not no ridge
        _ = LayerTerms(layer, statistics(x), False, layer.weight, damping="auto").ridge
    one_sample = DenseGram(9, with_drift=False, spread=True)
    one_sample.update(x)
    assert LayerTerms(layer, one_sample.statistics(), False, layer.weight, damping="auto").ridge == 0.0


def test_calibration_measures_the_spread_only_for_auto_and_sequential_passes_measure_it_again(tmp_path):
    """calibrate(spread=False), what a run at any other damping does, leaves it unmeasured; with
    ``--sequential`` each layer's statistics are gathered again on the partly quantized model, and
    with auto there too: every layer of the chain gets its own ridge."""
    model = mlp_model()
    x = np.random.default_rng(8).standard_normal((40, 8)).astype(np.float32)
    for spread in (False, True):
        calibrated = calibrate(model, load_dataset({"x": x}, model), Progress(), spread=spread)
        measured = [calibrated.statistics[layer.statistics_key].spread for layer in calibrated.layers]
        assert all((value is not None) == spread for value in measured)
    report = runs.quantize(model, tmp_path / "q.onnx", bits=2, calibration={"x": x}, sequential=True,
                           damping="auto", speed=False)
    assert len(report.layers) == 2 and all(layer.damping > 0 for layer in report.layers)
