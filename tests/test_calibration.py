import numpy as np

from graphs import mlp_model
from onnx_qubo.calibration import collect_statistics
from onnx_qubo.data import load_dataset
from onnx_qubo.discovery import find_dense_layers
from onnx_qubo.progress import Progress


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
