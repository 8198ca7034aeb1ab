"""Model inputs that are not a batch of samples along axis 0 (data.batch_axes): scalars and
fixed-size tensors fed whole to every batch, a state whose batch axis is 1."""

import numpy as np
import onnx
import pytest
import runs
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.calibration.data import batch_axes, load_dataset
from onnx_qubo.calibration.statistics import collect_statistics
from onnx_qubo.core.errors import DataError
from onnx_qubo.core.progress import Progress
from onnx_qubo.evaluation import verify
from onnx_qubo.graph.runtime import NONE, make_session
from onnx_qubo.graph.signature import model_inputs
from onnx_qubo.model.discovery import find_dense_layers

F, N_OUT = 4, 3


def state_model() -> onnx.ModelProto:
    """x [N, 4], state [2, N, 4], gain (scalar), offset [4] (fixed):
    h = x + state[1] * gain + offset -> Gemm -> y [N, 3]; state_out = state * gain [2, N, 4]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((N_OUT, F)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(1, np.int64), "one")]
    nodes = [helper.make_node("Gather", ["state", "one"], ["s1"], axis=0),
             helper.make_node("Mul", ["s1", "gain"], ["scaled"]),
             helper.make_node("Add", ["x", "scaled"], ["h0"]),
             helper.make_node("Add", ["h0", "offset"], ["h"]),
             helper.make_node("Gemm", ["h", "W"], ["y"], transB=1, name="dense"),
             helper.make_node("Mul", ["state", "gain"], ["state_out"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", F]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", F]),
              helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
              helper.make_tensor_value_info("offset", TensorProto.FLOAT, [F])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", N_OUT]),
               helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "N", F])]
    model = helper.make_model(helper.make_graph(nodes, "state", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def arrays(count: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((count, F)).astype(np.float32),
            "state": rng.standard_normal((2, count, F)).astype(np.float32),
            "gain": np.array(0.5, np.float32), "offset": rng.standard_normal(F).astype(np.float32)}


def test_batch_axes_follow_the_declared_shapes():
    assert batch_axes(model_inputs(state_model())) == {"x": 0, "state": 1, "gain": None, "offset": None}


def test_ambiguous_or_batchless_inputs_are_refused():
    model = state_model()
    model.graph.input[1].type.tensor_type.shape.dim[2].dim_param = "N"  # state [2, N, N]
    with pytest.raises(DataError, match="several axes carry the batch dimension's name"):
        batch_axes(model_inputs(model))
    whole = state_model()
    whole.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 5  # x [5, 4]: nothing symbolic is left
    whole.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 5
    assert batch_axes(model_inputs(whole)) == {"x": 0, "state": 0, "gain": None, "offset": 0}
    unnamed = state_model()
    for value in unnamed.graph.input[:2]:
        for dim in value.type.tensor_type.shape.dim:
            dim.ClearField("dim_param")  # x [?, 4], state [2, ?, 4], as exporters without names write them
    assert batch_axes(model_inputs(unnamed), arrays(10))["state"] == 1  # its symbolic axis holds 10 slices
    with pytest.raises(DataError, match=r"'state' \[2, \?, 4\]: .*unnamed.*as many slices as samples \(10\)"):
        batch_axes(model_inputs(unnamed), {**arrays(10), "state": np.zeros((2, 3, F), np.float32)})
    only_scalars = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])], "g", [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [])]))
    with pytest.raises(DataError, match="no model input has a batch axis"):
        batch_axes(model_inputs(only_scalars))


def test_batches_slice_the_state_on_axis_1_and_feed_scalars_whole():
    data = arrays(10)
    dataset = load_dataset(data, state_model(), batch_size=4)
    assert [batch["state"].shape for batch in dataset.batches] == [(2, 4, F), (2, 4, F), (2, 2, F)]
    assert all(batch["gain"].shape == () and batch["offset"].shape == (F,) for batch in dataset.batches)
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in dataset.batches], axis=1), data["state"])
    assert dataset.num_samples == 10 and [dataset.samples(b) for b in dataset.batches] == [4, 4, 2]
    assert dataset.head(dataset.batches[0], 1)["state"].shape == (2, 1, F)


def test_evaluation_runs_a_large_batch_in_pieces_with_the_outputs_of_one_run(monkeypatch):
    """onnxruntime's working memory follows the samples of a run: a batch of 100 runs in pieces
    fed at most RUN_INPUT_BYTES (here 32 samples: x and the state hold 48 bytes a sample; the
    state cut on its axis 1, the scalar and the offset fed whole to each), joined in order."""
    monkeypatch.setattr(verify, "RUN_INPUT_BYTES", 32 * 48 + 47)
    data, model = arrays(100), state_model()
    dataset = load_dataset(data, model, batch_size=256)
    pieces = verify.run_pieces(dataset, dataset.batches[0])
    assert [dataset.samples(piece) for piece in pieces] == [32, 32, 32, 4]
    assert all(piece["gain"].shape == () and piece["offset"].shape == (F,) for piece in pieces)
    whole = make_session(model, NONE).run(["y"], data)[0]
    np.testing.assert_allclose(verify.run_scores(model, NONE, dataset, "y", Progress(), "model", built=False),
                               whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"state": np.zeros((2, 9, F), np.float32)}, r"'x' 10 \(axis 0\), 'state' 9 \(axis 1\)"),
    ({"gain": np.full(10, 0.5, np.float32)}, "expects rank 0 .*fed whole to every batch"),
    ({"offset": np.zeros((10, F), np.float32)}, r"expects rank 1 \[4\] .*fed whole"),
])
def test_inputs_that_do_not_fit_their_batch_axis_are_refused(change, message):
    with pytest.raises(DataError, match=message):
        load_dataset({**arrays(10), **change}, state_model(), batch_size=4)


def _numpy_layer_input(data: dict[str, np.ndarray]) -> np.ndarray:
    return (data["x"] + data["state"][1] * data["gain"] + data["offset"]).astype(np.float64)


def test_statistics_on_sliced_batches_equal_numpy_on_all_samples():
    data, model = arrays(30), state_model()
    layers, _ = find_dense_layers(model)
    h = _numpy_layer_input(data)
    z = np.hstack([h, np.ones((30, 1))])
    for batch_size in (7, 30):
        stats = collect_statistics(model, layers, load_dataset(data, model, batch_size), Progress())["h"]
        assert stats.count == 30
        np.testing.assert_allclose(stats.gram, z.T @ z / 30, rtol=1e-5, atol=1e-6)


class OneSamplePerFeed:
    """A CalibrationDataReader giving one sample per feed, the state sliced on its axis 1."""

    def __init__(self, data):
        self.data, self.i = data, 0

    def get_next(self):
        if self.i == len(self.data["x"]):
            return None
        i, self.i = self.i, self.i + 1
        return {"x": self.data["x"][i:i + 1], "state": self.data["state"][:, i:i + 1],
                "gain": self.data["gain"], "offset": self.data["offset"]}


def test_quantize_from_arrays_and_from_a_reader(tmp_path):
    data, model = arrays(24), state_model()
    report = runs.quantize(model, tmp_path / "a.onnx", calibration=data, bits=4, solver="rtn", batch_size=5)
    assert report.calibration_samples == 24 and report.evaluation.samples == 24
    assert report.speed is not None
    read = runs.quantize(model, tmp_path / "r.onnx", calibration=OneSamplePerFeed(data),
                              evaluation=OneSamplePerFeed(data), bits=4, solver="rtn", speed=False)
    assert read.calibration_samples == 24 and read.evaluation.samples == 24
    assert read.layers[0].cost_solved == pytest.approx(report.layers[0].cost_solved, rel=1e-5)


def test_half_precision_inputs_take_wider_float_data_only_where_no_value_changes():
    """A float16 model's data in float32: cast when every value is a float16 (zeros, 0.5), refused
    in one line when rounding or overflow would change one; float64 into a float32 model is cast."""
    for elem, dtype in ((TensorProto.FLOAT16, np.float16), (TensorProto.FLOAT, np.float32)):
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                                  [helper.make_tensor_value_info("x", elem, ["N", 2])],
                                  [helper.make_tensor_value_info("y", elem, ["N", 2])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        wide = np.float32 if dtype == np.float16 else np.float64
        exact = load_dataset({"x": np.array([[0.5, -2.0], [0.0, 1024.0]], wide)}, model).batches[0]["x"]
        assert exact.dtype == dtype and exact.tolist() == [[0.5, -2.0], [0.0, 1024.0]]
        for value in (0.1, 70000.0):
            data = {"x": np.full((3, 2), value, wide)}
            if dtype == np.float32:
                assert load_dataset(data, model).batches[0]["x"].dtype == np.float32
                continue
            with pytest.raises(DataError, match="input 'x' has dtype float32 values that float16 cannot hold exactly"):
                load_dataset(data, model)
