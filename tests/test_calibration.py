import numpy as np
import pytest

from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.calibration.statistics import collect_statistics
from onnx_qubo.core.progress import Progress
from onnx_qubo.model.discovery import find_dense_layers

from graphs import mlp_model


def test_gram_of_every_layer_input_matches_numpy_and_does_not_depend_on_batching():
    model = mlp_model(widths=(8, 6, 4))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((70, 8)).astype(np.float32)
    layers, _ = find_dense_layers(model)
    # independent forward pass of the first layer to get the second layer's input
    w0, b0 = (np.frombuffer(model.graph.initializer[i].raw_data, np.float32) for i in (0, 1))
    hidden = np.maximum(x.astype(np.float64) @ w0.reshape(6, 8).T + b0, 0)

    for batch_size in (7, 70):
        stats = collect_statistics(model, layers, load_dataset({"x": x}, model, batch_size), Progress())
        for name, inputs in (("x", x.astype(np.float64)), ("r0", hidden)):
            z = np.hstack([inputs, np.ones((len(inputs), 1))])
            np.testing.assert_allclose(stats[name].gram, z.T @ z / len(z), rtol=1e-5, atol=1e-6)
            assert stats[name].count == 70


def test_quantized_input_statistics_match_numpy():
    """With a quantizer on an input, G is built from the quantized input x~, and the two extra
    sums E[z d^T], E[d d^T] (d = x - x~) from both."""
    from onnx_qubo.core.grid import InputQuantizer

    model = mlp_model(widths=(8, 6, 4))
    x = np.random.default_rng(2).standard_normal((50, 8)).astype(np.float32)
    layers, _ = find_dense_layers(model)
    quantizer = InputQuantizer.for_range(-1.0, 1.5, signed=False)
    stats = collect_statistics(model, layers[:1], load_dataset({"x": x}, model, 16), Progress(),
                               quantizers={"x": quantizer})["x"]
    seen = quantizer.fake_quantize(x).astype(np.float64)
    z, d = np.hstack([seen, np.ones((50, 1))]), x.astype(np.float64) - seen
    np.testing.assert_allclose(stats.gram, z.T @ z / 50, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.cross, z.T @ d / 50, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.drift, d.T @ d / 50, rtol=1e-6, atol=1e-12)
    assert np.abs(d).max() > 0


def test_input_ranges_by_minmax_and_percentile():
    from onnx_qubo.calibration.activations import input_quantizers

    model = mlp_model(widths=(8, 6, 4))
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 3, (20000, 8)).astype(np.float32)
    x[0, 0] = 40.0  # one outlier in 160,000 values: beyond the 99.999th percentile
    layers, _ = find_dense_layers(model)
    data = load_dataset({"x": x}, model, 4096)
    minmax = input_quantizers(model, layers, data, "uint8", "minmax", Progress())["x"]
    assert minmax.scale == pytest.approx(41.0 / 255, rel=1e-5)  # stored as float32
    percentile = input_quantizers(model, layers, data, "int8", "percentile", Progress())["x"]
    assert percentile.scale < minmax.scale / 5  # the outlier is clipped
    assert percentile.grid.qmin == -128 and percentile.fake_quantize(np.zeros(1))[0] == 0.0


def test_each_views_statistics_are_freed_after_its_last_layer(monkeypatch):
    """The plain path solves each layer once: a view's Gram matrix goes once its last layer is
    solved (two layers reading one tensor share it), not at the end of the run."""
    from onnx_qubo.api import quantize
    from onnx_qubo.calibration import statistics as calibration
    from onnx_qubo.config import QuantizeConfig

    events = []
    real_release = calibration.LayerStatistics.release
    monkeypatch.setattr(calibration.LayerStatistics, "release",
                        lambda self, key: events.append(("release", key, sorted(self.held))) or real_release(self, key))
    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    quantize(mlp_model(widths=(8, 6, 4)), QuantizeConfig.from_flat({"solver": "rtn"}), {"x": x})
    released = [key for _, key, _ in events]
    assert len(released) == len(set(released)) == 2
    assert events[-1][2] == [released[-1]]  # the last view is all that is held when it goes


def test_a_dense_views_gram_matrix_kept_as_its_upper_triangle_has_the_bits_of_the_full_sum():
    """DenseGram holds sum z z^T as its upper triangle and unpacks it when asked: the same bits as
    summing the full products (each is exactly symmetric), and a fresh matrix for each caller."""
    from onnx_qubo.calibration.grams import DenseGram

    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((rows, 9)).astype(np.float32) for rows in (5, 17, 1, 40)]
    gram, full = DenseGram(9, with_drift=False), np.zeros((10, 10))
    for x in batches:
        gram.update(x)
        z = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
        full += z.T @ z
    first, second = gram.statistics(), gram.statistics()
    assert gram.zz.values.size == 10 * 11 // 2
    np.testing.assert_array_equal(first.gram, full / 63)
    np.testing.assert_array_equal(second.gram, first.gram)  # divided once, not again
    assert first.gram is not second.gram and first.count == 63
