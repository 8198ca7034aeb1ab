"""Models whose weights live in external data files are read a layer at a time, and
calibration fits a memory budget by making several passes over the data."""

from __future__ import annotations

import logging
import shutil

import ml_dtypes
import numpy as np
import onnx
import pytest
import runs
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

import onnx_qubo
from onnx_qubo.calibration import memory
from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.cli import main
from onnx_qubo.core import external
from onnx_qubo.core.errors import OptionError
from onnx_qubo.core.progress import Progress
from onnx_qubo.core.types import FromFile, InMemory
from onnx_qubo.forms import GraphIndex
from onnx_qubo.graph.files import load_model
from onnx_qubo.graph.runtime import make_session
from onnx_qubo.pipeline import calibrate, find_layers, prepare

from graphs import mlp_model

X = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)


def external_model(folder, model=None):
    folder.mkdir(exist_ok=True)
    path = folder / "m.onnx"
    onnx.save(model or mlp_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    return path


def initializer_values(path):
    model = onnx.load(path)
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def test_weights_stay_in_their_file_until_read(tmp_path):
    model = load_model(external_model(tmp_path))
    assert all(uses_external_data(init) for init in model.graph.initializer)
    assert model.ByteSize() < 2000  # the graph only
    layers, _ = find_layers(prepare(model))
    assert all(isinstance(layer.values, FromFile) for layer in layers)
    in_memory, _ = find_layers(mlp_model())
    assert all(isinstance(layer.values, InMemory) for layer in in_memory)
    for lazy, loaded in zip(layers, in_memory):
        assert np.array_equal(lazy.weight, loaded.weight) and lazy.shape == loaded.shape


def test_sessions_read_the_input_folder_from_anywhere(tmp_path, monkeypatch):
    model = load_model(external_model(tmp_path))
    monkeypatch.chdir("/")  # references are relative to the model's folder, not the working directory
    expected = make_session(mlp_model()).run(None, {"x": X})[0]
    assert np.array_equal(make_session(model).run(None, {"x": X})[0], expected)
    index = GraphIndex(model)
    expected_weight = numpy_helper.to_array(mlp_model().graph.initializer[0])
    assert np.array_equal(index.array(index.initializers["W0"]), expected_weight)


def test_a_spilled_model_maps_its_weights_from_its_own_folder_and_computes_the_same(tmp_path):
    """``spill`` moves weights in the proto and weights in the input's file alike into one aligned
    file of a new folder: the proto keeps the graph, and the input's file is no longer needed."""
    def wide():
        return mlp_model(widths=(8, 64, 4))  # weights of 2 KB and 1 KB, biases under SPILL_LEAST

    expected = make_session(wide()).run(None, {"x": X})[0]
    for source in ("memory", "file"):
        model = wide() if source == "memory" else load_model(external_model(tmp_path / source, wide()))
        folder = tmp_path / f"spilled-{source}"
        folder.mkdir()
        external.spill(model, folder)
        if source == "file":
            shutil.rmtree(tmp_path / source)
        assert external.session_folder(model) == folder.resolve()
        moved = [uses_external_data(init) for init in model.graph.initializer]
        large = [external.tensor_bytes(init) >= external.SPILL_LEAST for init in model.graph.initializer]
        assert moved == ([True] * len(moved) if source == "file" else large) and any(large)  # all its file held
        offsets = [int(e.value) for init in model.graph.initializer for e in init.external_data if e.key == "offset"]
        assert all(offset % external.SPILL_ALIGN == 0 for offset in offsets) and len(set(offsets)) == len(offsets)
        assert np.array_equal(make_session(model).run(None, {"x": X})[0], expected)
        weights = {init.name: numpy_helper.to_array(init) for init in wide().graph.initializer}
        assert all(np.array_equal(external.read_array(init, model), weights[init.name])
                   for init in model.graph.initializer)
    with pytest.raises(FileExistsError):  # never over a file already there
        external.spill(wide(), tmp_path / "spilled-memory")


@pytest.mark.slow
def test_external_input_quantizes_like_the_same_model_in_memory(tmp_path):
    """Same integers and scales either way; the output holds every tensor itself (no reference
    to the input's data file) and loads from another folder."""
    path = external_model(tmp_path)
    report = runs.quantize(path, tmp_path / "lazy.onnx", calibration={"x": X}, bits=3, speed=False)
    assert report.input_bytes == path.stat().st_size + (tmp_path / "m.data").stat().st_size
    runs.quantize(mlp_model(), tmp_path / "memory.onnx", calibration={"x": X}, bits=3, speed=False)
    lazy, eager = initializer_values(tmp_path / "lazy.onnx"), initializer_values(tmp_path / "memory.onnx")
    assert lazy.keys() == eager.keys()
    assert all(np.array_equal(lazy[name], eager[name]) for name in lazy)
    written = onnx.load(tmp_path / "lazy.onnx", load_external_data=False)
    assert not any(uses_external_data(init) for init in written.graph.initializer)
    assert not any(prop.key == external.FOLDER_KEY for prop in written.metadata_props)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(tmp_path / "lazy.onnx", elsewhere / "lazy.onnx")
    make_session(onnx.load(elsewhere / "lazy.onnx")).run(None, {"x": X})


@pytest.mark.slow
def test_external_output_of_external_input(tmp_path):
    path = external_model(tmp_path)
    runs.quantize(path, tmp_path / "out.onnx", calibration={"x": X}, external_data=True, speed=False)
    written = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    locations = {entry.value for init in written.graph.initializer for entry in init.external_data
                 if entry.key == "location"}
    assert locations == {"out.onnx.data"}
    runs.quantize(mlp_model(), tmp_path / "ref.onnx", calibration={"x": X}, speed=False)
    expected = initializer_values(tmp_path / "ref.onnx")
    assert all(np.array_equal(v, expected[k]) for k, v in initializer_values(tmp_path / "out.onnx").items())


@pytest.mark.slow
def test_a_budget_too_small_for_all_statistics_takes_more_passes_and_the_same_bits(tmp_path, caplog):
    model = mlp_model(widths=(8, 16, 16, 4))
    layers, _ = find_layers(model)
    dataset = load_dataset({"x": X}, model)
    weights = memory.weights_bytes(model)
    solving = max(memory.solve_bytes(layer) for layer in layers)
    # the spread too: the runs below are at 2 bits, where --damping is auto
    one_view = max(memory.statistics_bytes(layer, drift=False, spread=True) for layer in layers)
    budget = weights + solving + one_view  # room for one layer's statistics at a time
    groups = memory.calibration_groups(layers, budget, weights, drift=False, spread=True)
    assert len(groups) == len(layers)
    assert [layer.name for group in groups for layer in group] == [layer.name for layer in layers]
    calibrated = calibrate(model, dataset, Progress(), max_memory=budget)
    assert calibrated.statistics.passes == 0  # nothing gathered before a layer asks
    runs.quantize(model, tmp_path / "one.onnx", calibration={"x": X}, speed=False)
    with caplog.at_level(logging.INFO, logger="onnx_qubo.pipeline"):
        runs.quantize(model, tmp_path / "passes.onnx", calibration={"x": X}, speed=False,
                           max_memory=budget / 1e9)
    assert "calibrating in 3 passes over the data" in caplog.text
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "passes.onnx").read_bytes()


def test_a_budget_too_small_for_one_layer_is_a_clear_error(tmp_path):
    path = external_model(tmp_path)
    np.savez(tmp_path / "m.calib.npz", x=X)
    with pytest.raises(OptionError, match=r"too small: the model's weights take .* give at least"):
        runs.quantize(path, tmp_path / "out.onnx", max_memory=1e-6)
    result = CliRunner().invoke(main, ["quantize", str(path), str(tmp_path / "out.onnx"), "--max-memory", "0.000001"])
    assert result.exit_code == 1
    assert "--max-memory 1 KB is too small" in result.output
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("value", [0, -1, float("nan"), "4GB", True])
def test_max_memory_must_be_a_positive_number(tmp_path, value):
    with pytest.raises(OptionError, match="max_memory must be a positive number of GB"):
        runs.quantize(mlp_model(), tmp_path / "out.onnx", calibration={"x": X}, max_memory=value)


def test_batches_run_in_pieces_give_the_same_statistics(monkeypatch):
    """Captured tensors past CAPTURE_BYTES: each batch runs in pieces of fewer samples, and the
    sums are those of whole batches (up to float rounding)."""
    from onnx_qubo.calibration import statistics as calibration

    model = mlp_model(widths=(8, 16, 4))
    layers, _ = find_layers(model)
    dataset = load_dataset({"x": X}, model, batch_size=32)
    whole = calibration.collect_statistics(model, layers, dataset, Progress())
    seen = []
    original = calibration.stream_inputs

    def counting(*args, **kwargs):
        for samples, inputs in original(*args, **kwargs):
            seen.append(samples)
            yield samples, inputs

    monkeypatch.setattr(calibration, "CAPTURE_BYTES", 16 * 4 * 3)  # three samples of the 16-wide hidden layer
    monkeypatch.setattr(calibration, "stream_inputs", counting)
    pieces = calibration.collect_statistics(model, layers, dataset, Progress())
    assert seen[0] == calibration.PROBE_SAMPLES and set(seen[1:]) <= {3, 2, 1} and sum(seen) == len(X)
    for key, statistics in whole.items():
        assert pieces[key].count == statistics.count == len(X)
        np.testing.assert_allclose(pieces[key].gram, statistics.gram, rtol=1e-12, atol=1e-12)


def test_a_model_object_with_unloaded_external_data_is_a_clear_error(tmp_path):
    model = onnx.load(external_model(tmp_path), load_external_data=False)
    with pytest.raises(onnx_qubo.QuboInputError, match="refers to external data that was not loaded"):
        runs.quantize(model, tmp_path / "out.onnx", calibration={"x": X}, speed=False)
    assert not (tmp_path / "out.onnx").exists()


def test_two_bit_tensors_in_external_data_take_their_packed_bytes(tmp_path):
    """An INT2 initializer's external data holds four values a byte: its length entry is checked
    against that (a model quantized to 2 bits and saved with external data loads again)."""
    codes = numpy_helper.from_array(np.zeros((4, 8), ml_dtypes.int2), "q")
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [codes, numpy_helper.from_array(np.array(0.5, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    path = external_model(tmp_path, model)
    stored = next(i for i in onnx.load(path, load_external_data=False).graph.initializer if i.name == "q")
    assert {e.key: e.value for e in stored.external_data}["length"] == "8"
    assert external.tensor_bytes(stored) == 8
    assert external.data_info(stored).length == 8
    load_model(path)  # no ModelError about the length
