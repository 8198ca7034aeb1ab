"""The per-layer defaults. The grid, when ``--symmetric/--asymmetric`` is not given: each layer
(each group of a grouped Conv, each embedding table) gets the grid whose round-to-nearest error is
lower, and the model written from the mixed choice computes what its integers say. The bias
correction, when not asked for or refused: where a layer has a bias to fold it into."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from runs import quantize
from test_conv import conv_model

from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.grid import Granularity, Scheme
from onnx_qubo.forms.gather import EmbeddingTable, quantize_table, quantize_table_on

from graphs import matmul_model, mlp_model

UNSIGNED = (TensorProto.UINT2, TensorProto.UINT4, TensorProto.UINT8)


def initializers(path):
    return {i.name: i for i in onnx.load(path).graph.initializer}


def test_the_grid_is_unset_by_default_and_the_config_says_so():
    config = QuantizeConfig()
    assert config.weights.symmetric is None
    assert [s.symmetric for s in config.weights.grids()] == [True, False]
    assert "symmetric or asymmetric per layer" in config.describe()
    assert QuantizeConfig.from_json(config.to_json()) == config
    assert [s.symmetric for s in QuantizeConfig.from_flat(symmetric=False).weights.grids()] == [False]


@pytest.mark.parametrize("bits", [2, 4])
def test_each_layer_gets_the_grid_whose_rounding_costs_less(tmp_path, bits):
    model = mlp_model(widths=(12, 10, 6))
    w0 = next(i for i in model.graph.initializer if i.name == "W0")
    w0.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(w0)), "W0"))  # leans to one side
    x = np.random.default_rng(0).standard_normal((128, 12)).astype(np.float32)
    runs = {}
    for symmetric in (None, True, False):
        path = tmp_path / f"{symmetric}.onnx"
        report = quantize(model, path, bits=bits, calibration={"x": x}, solver="rtn", symmetric=symmetric,
                          bias_correction=False, speed=False)  # cost_rtn is then what the choice compares
        runs[symmetric] = (report, initializers(path))
    chosen, signed, unsigned = runs[None], runs[True], runs[False]
    for k, name in enumerate(["W0", "W1"]):
        costs = signed[0].layers[k].cost_rtn, unsigned[0].layers[k].cost_rtn
        expected = signed if costs[0] <= costs[1] else unsigned
        assert chosen[0].layers[k].cost_rtn == pytest.approx(min(costs), rel=1e-9)
        for suffix in ("_quantized", "_scale", "_zero_point"):
            written = chosen[1].get(name + suffix)
            assert (written is None) == (expected[1].get(name + suffix) is None)
            if written is not None:
                assert written.data_type == expected[1][name + suffix].data_type
                np.testing.assert_array_equal(numpy_helper.to_array(written),
                                              numpy_helper.to_array(expected[1][name + suffix]))
    assert chosen[1]["W0_quantized"].data_type in UNSIGNED  # positive weights: the zero point pays
    evaluation = chosen[0].evaluation
    assert evaluation.default_vs_unoptimized < 1e-5 and evaluation.basic_vs_unoptimized < 1e-5


def test_groups_that_chose_different_grids_are_written_as_one_conv_on_the_unsigned_grid(tmp_path):
    """Group 0's rows hold only -s, 0 and s, which the signed grid stores exactly and the
    unsigned one cannot; group 1's are positive. The merged Conv keeps both exactly: group 0 moved
    to the unsigned grid with zero point 2."""
    model = conv_model(channels=(2, 4), group=2, pads=[1, 1, 1, 1])
    rng = np.random.default_rng(5)
    weight = np.empty((4, 1, 3, 3), np.float32)
    weight[:2] = 0.25 * rng.choice([-1.0, 0.0, 1.0], size=(2, 1, 3, 3))
    weight[:2, 0, 0, :2] = [-0.25, 0.25]  # every row reaches both ends
    weight[2:] = rng.uniform(0.1, 1.0, size=(2, 1, 3, 3))
    next(i for i in model.graph.initializer if i.name == "W").CopyFrom(numpy_helper.from_array(weight, "W"))
    x = rng.standard_normal((16, 2, 9, 8)).astype(np.float32)
    report = quantize(model, tmp_path / "q.onnx", bits=2, calibration={"x": x}, speed=False)
    inits = {name: numpy_helper.to_array(i) for name, i in initializers(tmp_path / "q.onnx").items()}
    assert initializers(tmp_path / "q.onnx")["W_quantized"].data_type == TensorProto.UINT2
    codes, zero_point, scale = (inits["W_quantized"].reshape(4, -1).astype(np.float64),
                                inits["W_zero_point"].astype(np.float64), inits["W_scale"])
    assert list(zero_point[:2]) == [2, 2]
    dequantized = (codes - zero_point[:, None]) * scale[:, None]
    np.testing.assert_allclose(dequantized[:2], weight[:2].reshape(2, -1), atol=1e-7)
    assert report.layers[0].storage == "UINT2"
    evaluation = report.evaluation
    assert evaluation.default_vs_unoptimized < 1e-5 and evaluation.basic_vs_unoptimized < 1e-5


def test_a_table_gets_the_grid_with_the_least_squared_error():
    rng = np.random.default_rng(2)
    grids = [Scheme(3, Granularity.BLOCK, 16, symmetric) for symmetric in (True, False)]
    for values, signed in ((rng.uniform(0.0, 1.0, (40, 32)), False),  # one-sided: the zero point pays
                           (rng.choice([-1.0, 0.0, 1.0, 2.0, 3.0], (40, 32)) / 4, True)):  # on the signed grid
        table = EmbeddingTable("gather", "table", values, "ids")
        each = [quantize_table(table, scheme) for scheme in grids]
        chosen = quantize_table_on(table, grids)
        assert chosen.codes.signed == signed
        assert chosen.mean_squared_error == min(q.mean_squared_error for q in each)


@pytest.mark.parametrize("bias", [True, False])
def test_the_default_corrects_the_bias_only_where_a_layer_has_one(tmp_path, bias):
    """Unset, --bias-correction folds the mean error into a bias the layer has (no node added) and
    leaves a bias-less layer as it is (no Add)."""
    model = matmul_model(bias=bias)
    x = (np.random.default_rng(4).standard_normal((64, 6)) + 1.0).astype(np.float32)
    runs = {c: quantize(model, tmp_path / f"{c}.onnx", bits=2, calibration={"x": x}, bias_correction=c, speed=False)
            for c in (None, True, False)}
    nodes = {c: [n.op_type for n in onnx.load(tmp_path / f"{c}.onnx").graph.node] for c in runs}
    corrected = runs[None].layers[0].cost_bias_corrected is not None
    assert corrected == bias
    assert nodes[None] == nodes[True if bias else False]
    assert nodes[None].count("Add") == int(bias)
    assert runs[None].layers[0].final_cost == pytest.approx(runs[bias].layers[0].final_cost, rel=1e-12)
