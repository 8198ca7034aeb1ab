"""``--damping auto`` (onnx_qubo/calibration/spread.py): the spread of the per-sample Gram
matrices each view measures while it calibrates, checked against numpy on the samples' own Gram
matrices, and the Ledoit-Wolf ridge taken from it, which lowers a layer's error on samples the
calibration did not see where its Gram matrix is estimated from too few."""

from __future__ import annotations

import numpy as np
import pytest
from test_layer import numpy_error, statistics

from onnx_qubo.calibration.grams import DenseGram
from onnx_qubo.calibration.patches import PatchGram, patches
from onnx_qubo.calibration.spread import MAX_SHRINKAGE, SampleSpread, shrinkage_damping
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.errors import OptionError
from onnx_qubo.core.progress import Progress
from onnx_qubo.core.views import ConvGeometry
from onnx_qubo.layer import LayerTerms, prepare_layer
from onnx_qubo.model.discovery import find_dense_layers
from onnx_qubo.plan import make_plan

from graphs import gemm_model


def reference_spread(grams: list[np.ndarray]) -> float:
    """sum_t ||G_t / tr G_t - mean||_F^2 / T^2, in float64."""
    units = np.array([g / np.trace(g) for g in grams])
    return float(((units - units.mean(axis=0)) ** 2).sum() / len(units) ** 2)


def samples_of(rng: np.random.Generator, count: int, rows: int, f: int) -> np.ndarray:
    """``count`` samples of ``rows`` vectors each, every sample with its own scale and mixing."""
    return np.array([rng.uniform(0.2, 3.0) * rng.standard_normal((rows, f))
                     @ (np.eye(f) + 0.5 * rng.standard_normal((f, f))) for _ in range(count)])


def test_a_dense_views_spread_is_that_of_its_samples_gram_matrices():
    """Rows split evenly between a batch's samples, in order: the spread of those samples' Gram
    matrices (z's weight part), over batches of different sizes; the Gram matrix itself is still
    the mean over every row."""
    rng = np.random.default_rng(0)
    f, rows = 5, 7
    batches = [samples_of(rng, count, rows, f) for count in (3, 1, 4)]
    accumulator = DenseGram(f, with_drift=False)
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
    accumulator = DenseGram(4, with_drift=False)
    accumulator.update(rng.standard_normal((5, 4)), samples=2)
    assert accumulator.statistics().spread is None
    two = DenseGram(4, with_drift=False)
    for _ in range(2):
        two.update(rng.standard_normal((5, 4)), samples=1)
    assert two.statistics().spread is not None


def test_a_convs_spread_is_per_image_and_per_group():
    """Each image's patches make one sample of each group's spread."""
    rng = np.random.default_rng(2)
    geometry = ConvGeometry.from_attributes({"group": 2, "pads": [1, 1, 1, 1]}, (4, 2, 3, 3), 4)
    images = rng.standard_normal((5, 4, 6, 7)) * rng.uniform(0.2, 3.0, (5, 1, 1, 1))
    accumulator = PatchGram(geometry, max_bytes=8 * geometry.features * 2 * 9)  # chunks split the images
    accumulator.update(images[:2])
    accumulator.update(images[2:])
    result = accumulator.result()
    assert result.spread is not None
    for g in range(2):
        grams = [p[g].T @ p[g] for p in (patches(images[k:k + 1], geometry) for k in range(5))]
        assert result.spread[g] == pytest.approx(reference_spread(grams), rel=1e-5)
        assert result.group(g).spread == pytest.approx(float(result.spread[g]))


def test_a_sample_of_zeros_is_not_counted():
    spread = SampleSpread(3, groups=2)
    grams = np.stack([np.eye(3), np.zeros((3, 3))])
    spread.add(grams)
    spread.add(2 * grams)
    assert list(spread.samples) == [2, 0]
    result = spread.spread()
    assert result[0] == pytest.approx(0.0, abs=1e-12) and np.isnan(result[1])


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
    assert shrinkage_damping(None, objective) == 0.0
    assert shrinkage_damping(1e6, objective) == pytest.approx(MAX_SHRINKAGE / (1 - MAX_SHRINKAGE))


def held_out_cost(damping: object, x: np.ndarray, unseen: np.ndarray, samples: int) -> tuple[float, float]:
    """A layer's scales and rounding from ``x`` (``samples`` samples of its rows) at ``damping``:
    its ridge and its output error on ``unseen``, in numpy."""
    layer = find_dense_layers(gemm_model(f=x.shape[1], n=6, trans_b=1, alpha=1.0, beta=1.0, relu=False, seed=4))[0][0]
    accumulator = DenseGram(x.shape[1], with_drift=False)
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


def test_layer_terms_without_auto_keep_the_damping_given():
    layer = find_dense_layers(gemm_model(f=9, n=4, trans_b=1, alpha=0.5, beta=2.0, relu=False))[0][0]
    x = np.random.default_rng(6).standard_normal((50, 9))
    assert LayerTerms(layer, statistics(x), False, layer.weight, damping=0.25).ridge == 0.25
    assert LayerTerms(layer, statistics(x), False, layer.weight, damping="auto").ridge == 0.0  # no spread: one sample
