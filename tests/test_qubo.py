"""The QUBO energy of a rounding must equal the squared output error it causes, measured by
running the layer with dequantized weights in onnxruntime (an independent path)."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.calibration.statistics import collect_statistics
from onnx_qubo.core.grid import IntegerGrid
from onnx_qubo.core.progress import Progress
from onnx_qubo.model.discovery import find_dense_layers

from graphs import gemm_model
from problems import channel_problem, max_abs_scale, random_problem


def pre_activations(weights: list[np.ndarray], alpha: float, x: np.ndarray) -> list[np.ndarray]:
    """Run ``alpha * x @ W^T`` for each weight in one onnxruntime session."""
    inits, nodes, outputs = [], [], []
    for k, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"W{k}"))
        nodes.append(helper.make_node("Gemm", ["x", f"W{k}"], [f"y{k}"], transB=1, alpha=alpha))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, ["B", w.shape[0]]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", x.shape[1]])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [y.astype(np.float64) for y in session.run(None, {"x": x})]


@pytest.mark.parametrize("bits,trans_b,alpha", [(2, 1, 1.0), (2, 0, 0.7), (3, 1, -1.3), (1, 1, 1.0)])
def test_energy_equals_measured_output_error(bits, trans_b, alpha):
    rng = np.random.default_rng(bits)
    f, n = 12, 7
    model = gemm_model(f=f, n=n, trans_b=trans_b, alpha=alpha)
    x = (rng.standard_normal((300, f)) + 0.5).astype(np.float32)
    layer = find_dense_layers(model)[0][0]
    stats = collect_statistics(model, [layer], load_dataset({"x": x}, model, batch_size=64), Progress())
    grid = IntegerGrid(bits)
    scale = max_abs_scale(layer.weight, bits) * 0.6  # clipped: some weights are fixed
    problem = channel_problem(layer.weight, scale, bits, stats["x"].x_gram, layer.gain)
    assert not problem.rounding.free.all()

    for _ in range(3):
        choice = rng.random((n, f)) < 0.5
        integers = problem.integers(choice)
        assert integers.min() >= grid.qmin and integers.max() <= grid.qmax
        y_float, y_quant = pre_activations([layer.weight, integers * scale[:, None]], alpha, x)
        measured = ((y_float - y_quant) ** 2).sum(axis=1).mean()
        np.testing.assert_allclose(problem.energy(choice), measured, rtol=1e-4)
        per_neuron = ((y_float - y_quant) ** 2).mean(axis=0)
        np.testing.assert_allclose(problem.neuron_energies(choice), per_neuron, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("general", [False, True])
def test_neuron_qubo_matches_layer_energy_and_upper_triangular_form(general):
    rng = np.random.default_rng(0)
    n, f = 4, 9
    problem = random_problem(n, f, general=general)
    for i in range(n):
        qubo = problem.neuron_qubo(i)
        q = qubo.upper_triangular()
        assert np.allclose(q, np.triu(q))
        for _ in range(5):
            v = rng.random(len(qubo.variables)) < 0.5
            choice = np.zeros((n, f), dtype=bool)
            choice[i, qubo.variables] = v
            expected = problem.neuron_energies(choice)[i]
            assert qubo.energy(v) == pytest.approx(expected, rel=1e-9)
            assert v @ q @ v + qubo.constant == pytest.approx(expected, rel=1e-9)
