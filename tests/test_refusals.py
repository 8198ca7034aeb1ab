"""Inputs never destroyed, special files never replaced, shapes kept, and every bad input
refused with one line and its exit status.

``BAD_INPUTS`` is the table of bad inputs: each case builds its files in a fresh folder and
returns the command line; ``benchmarks/bad_inputs.py`` renders it as docs/bad_inputs.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import runs
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo import api
from onnx_qubo.cli import main
from onnx_qubo.core.errors import DataError, ModelError, OptionError, OutputError, QuboInputError
from onnx_qubo.graph import files
from onnx_qubo.graph.runtime import make_session
from onnx_qubo.rounding.exchange import file_stems, read_problem

from graphs import matmul_model, mlp_model

X = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)


def mlp_dir(folder: Path, model: onnx.ModelProto | None = None, external: bool = False) -> Path:
    """``folder/m.onnx`` (weights in ``m.data`` when ``external``) with ``m.calib.npz`` beside it."""
    path = folder / "m.onnx"
    if external:
        onnx.save(model or mlp_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location="m.data", size_threshold=0)
    else:
        onnx.save(model or mlp_model(), path)
    np.savez(folder / "m.calib.npz", x=X)
    return path


def relocate_external_data(path: Path, location: str) -> None:
    """Point every external tensor of the model at ``path`` to ``location``."""
    model = onnx.load(path, load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def fixed_batch_model(batch: int) -> onnx.ModelProto:
    """mlp_model with its input and output first axis fixed to ``batch`` (torch.onnx.export
    without dynamic axes)."""
    model = mlp_model()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model


def transposed_output_model() -> onnx.ModelProto:
    """Gemm then Transpose: the output is [n, B], not batch-first."""
    w = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="fc"),
         helper.make_node("Transpose", ["h"], ["y"], perm=[1, 0])], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "B"])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def nan_bias_model() -> onnx.ModelProto:
    model = mlp_model(widths=(8, 4))
    bias = next(i for i in model.graph.initializer if i.name == "b0")
    values = numpy_helper.to_array(bias).copy()
    values[1] = np.nan
    bias.CopyFrom(numpy_helper.from_array(values, "b0"))
    return model


@dataclass(frozen=True)
class BadInput:
    """A bad input: ``setup(folder)`` builds it and returns the CLI arguments; the run must exit
    with ``status`` and a one-line message containing ``message``."""

    title: str
    setup: Callable[[Path], list[str]]
    message: str
    status: int = 1


def _external(folder: Path, location: str | None = None) -> Path:
    model = mlp_dir(folder, external=True)
    if location is not None:
        relocate_external_data(model, location)
    return model


def _symlinked_data(folder: Path) -> list[str]:
    model = _external(folder)
    (folder / "real.data").write_bytes((folder / "m.data").read_bytes())
    (folder / "m.data").unlink()
    (folder / "m.data").symlink_to(folder / "real.data")
    return [model, folder / "out.onnx"]


def _hard_linked_data(folder: Path) -> list[str]:
    model = _external(folder)
    (folder / "also.data").hardlink_to(folder / "m.data")
    return [model, folder / "out.onnx"]


def _fifo(folder: Path) -> list[str]:
    os.mkfifo(folder / "pipe")
    return [mlp_dir(folder), folder / "pipe", "--solver", "rtn"]


def _escaping_solution(folder: Path) -> list[str]:
    dump = folder / "d"
    dump.mkdir()
    (folder / "secret.qubo.npz").write_bytes(b"")
    (dump / "index.json").write_text(json.dumps([{"layer": "fc0", "file": "../secret.qubo.npz"}]))
    return [mlp_dir(folder), folder / "out.onnx", "--load-solution", dump]


def _report_over_solution(folder: Path) -> list[str]:
    model = mlp_dir(folder)
    runs.quantize(model, folder / "dumped.onnx", solver="rtn", speed=False, dump_qubo=folder / "d")
    np.save(folder / "d" / "fc0.solution.npy", np.zeros((6, 8), np.int8))
    return [model, folder / "out.onnx", "--load-solution", folder / "d", "--report", folder / "d" / "fc0.solution.npy"]


def _planted_symlink(folder: Path) -> list[str]:
    dump = folder / "d"
    dump.mkdir()
    (folder / "victim.txt").write_text("keep me")
    (dump / "fc0.qubo.npz").symlink_to(folder / "victim.txt")
    return [mlp_dir(folder), folder / "out.onnx", "--dump-qubo", dump, "--solver", "rtn"]


def _fixed_batch(folder: Path) -> list[str]:
    model = mlp_dir(folder, fixed_batch_model(4))
    np.savez(folder / "m.calib.npz", x=X[:3])
    return [model, folder / "out.onnx", "--solver", "rtn"]


def _not_batch_first(folder: Path) -> list[str]:
    return [mlp_dir(folder, transposed_output_model()), folder / "out.onnx", "--solver", "rtn", "--batch-size", "16"]


def _npy_calibration(folder: Path) -> list[str]:
    np.save(folder / "x.npy", X)
    return [mlp_dir(folder), folder / "out.onnx", "--calib", folder / "x.npy"]


def _long_output(folder: Path) -> list[str]:
    return [mlp_dir(folder), folder / ("o" * 251 + ".onnx"), "--solver", "rtn"]


BAD_INPUTS = [
    BadInput("output is the input model", lambda d: [mlp_dir(d), d / "m.onnx"], "is the input model"),
    BadInput("output is the model's external data file", lambda d: [_external(d), d / "m.data"],
             "is external data of the input model"),
    BadInput("output is the calibration file found beside the model",
             lambda d: [mlp_dir(d), d / "m.calib.npz"], "is a data file this run reads"),
    BadInput("`--report` is the `--eval` file",
             lambda d: [mlp_dir(d), d / "out.onnx", "--eval", d / "m.calib.npz", "--report", d / "m.calib.npz"],
             "is a data file this run reads"),
    BadInput("output is a FIFO", _fifo, "is not a regular file"),
    BadInput("output is `/dev/null`", lambda d: [mlp_dir(d), "/dev/null"], "is a device or kernel file"),
    BadInput("output is `/dev/stdout`", lambda d: [mlp_dir(d), "/dev/stdout"], "is a device or kernel file"),
    BadInput("output is a directory", lambda d: [mlp_dir(d), d], "is a directory"),
    BadInput("output ends in `/`", lambda d: [mlp_dir(d), f"{d}/new/"], "is a directory"),
    BadInput("output name longer than 255 bytes", _long_output, "cannot be written"),
    BadInput("model is a directory", lambda d: [d, d / "out.onnx"], "is a directory"),
    BadInput("model is not ONNX", lambda d: [(d / "m.onnx", (d / "m.onnx").write_text("hello"))[0],
                                             d / "out.onnx"], "is not a readable ONNX model"),
    BadInput("external data file missing", lambda d: [_external(d, "gone.data"), d / "out.onnx"],
             "which does not exist"),
    BadInput("external data outside the model's folder (`../`)",
             lambda d: [_external(d, "../m.data"), d / "out.onnx"], "outside the model's folder"),
    BadInput("external data at an absolute path", lambda d: [_external(d, "/etc/hostname"), d / "out.onnx"],
             "not a path relative to the model's folder"),
    BadInput("external data is a symlink", _symlinked_data, "a symbolic link"),
    BadInput("external data file with a second hard link", _hard_linked_data, "a file with 2 hard links"),
    BadInput("`inspect` with external data missing", lambda d: ["inspect", _external(d, "gone.data")],
             "which does not exist"),
    BadInput("`--calib` is a `.npy` file", _npy_calibration, "holds a single array (.npy)"),
    BadInput("fixed-batch model ([4, f]), 3 samples", _fixed_batch, "there are only 3"),
    BadInput("`--max-memory` too small for one layer",
             lambda d: [mlp_dir(d), d / "out.onnx", "--max-memory", "0.000001"], "give at least"),
    BadInput("output not batch-first, several batches", _not_batch_first, "its first axis is not the batch"),
    BadInput("only layer's bias holds NaN", lambda d: [mlp_dir(d, nan_bias_model()), d / "out.onnx"],
             "bias 'b0' holds NaN or Inf"),
    BadInput("`--load-solution` index names `../` files", _escaping_solution, "only plain"),
    BadInput("`--report` is a `--load-solution` file", _report_over_solution,
             "is a --load-solution file this run reads"),
    BadInput("`--dump-qubo` folder holds a planted symlink", _planted_symlink, "is a symbolic link"),
    BadInput("`--bits 9`", lambda d: [mlp_dir(d), d / "out.onnx", "--bits", "9"], "--bits must be between 1 and 8", 1),
]


def digests(folder: Path) -> dict[str, str]:
    """Content hash of every regular file under ``folder`` (symlinks and FIFOs by kind)."""
    result = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not path.is_file():
            result[str(path)] = "symlink" if path.is_symlink() else "dir" if path.is_dir() else "special"
        else:
            result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def assert_refused(case: BadInput, tmp_path: Path) -> None:
    """Build and run one case: refused with its status and message in one line (no traceback, no
    "please report"), and nothing under ``tmp_path`` changed (inputs untouched, no output, no
    temporary file)."""
    folder = tmp_path / "work"
    folder.mkdir()
    args = [str(a) for a in case.setup(folder)]
    before = digests(tmp_path)
    result = CliRunner().invoke(main, args)
    output = result.output.replace(str(folder), "DIR")
    assert result.exit_code == case.status, output
    assert case.message in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in output and "please report" not in output
    if case.status == 1:  # one line, after any progress lines
        assert output.strip().splitlines()[-1].startswith("Error: "), output
        assert sum(line.startswith("Error: ") for line in output.splitlines()) == 1, output
    assert digests(tmp_path) == before


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.title for c in BAD_INPUTS])
def test_bad_input_is_refused_in_one_line_and_nothing_changes(case, tmp_path):
    assert_refused(case, tmp_path)


def test_dev_null_stays_a_device(tmp_path):
    """As root, an output that is a device used to be replaced by a regular file."""
    result = CliRunner().invoke(main, [str(mlp_dir(tmp_path)), "/dev/null", "--solver", "rtn"])
    assert result.exit_code == 1 and os.path.exists("/dev/null")
    assert not Path("/dev/null").is_file()


def test_writable_path_refuses_symlink_to_fifo_and_allows_symlink_to_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to_pipe").symlink_to(tmp_path / "pipe")
    with pytest.raises(OutputError, match="not a regular file"):
        files.writable_path(tmp_path / "to_pipe", reads=(), what="output")
    (tmp_path / "file").write_text("x")
    (tmp_path / "to_file").symlink_to(tmp_path / "file")
    assert files.writable_path(tmp_path / "to_file", reads=(), what="output") == tmp_path / "to_file"
    with pytest.raises(OutputError, match="this run reads"):  # a symlink to a file read
        files.writable_path(tmp_path / "to_file", reads=[tmp_path / "file"], what="output")
    os.link(tmp_path / "file", tmp_path / "hard")
    with pytest.raises(OutputError, match="this run reads"):  # a hard link to it
        files.writable_path(tmp_path / "hard", reads=[tmp_path / "file"], what="output")


def test_symlinked_output_is_replaced_not_written_through(tmp_path):
    (tmp_path / "target.txt").write_text("keep")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "target.txt")
    runs.quantize(mlp_model(), tmp_path / "link.onnx", calibration={"x": X}, solver="rtn")
    assert (tmp_path / "target.txt").read_text() == "keep"
    assert not (tmp_path / "link.onnx").is_symlink()


def test_external_data_model_is_quantized_and_data_left_alone(tmp_path):
    model = mlp_dir(tmp_path, external=True)
    before = digests(tmp_path)
    runs.quantize(model, tmp_path / "out.onnx", solver="rtn")
    assert {k: v for k, v in digests(tmp_path).items() if not k.endswith("out.onnx")} == before
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)


def test_bias_with_more_dims_than_activation_keeps_output_shape(tmp_path):
    """MatMul + Add(b[1, 1, n]) on x[B, f]: the output is [1, B, n]; an [n] bias would make it [B, n]."""
    model = matmul_model(f=8, n=5)
    bias = next(i for i in model.graph.initializer if i.name == "b")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).reshape(1, 1, 5), "b"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "B", 5]))
    for bias_mode, activations in (("quantize", "none"), ("int32", "int8")):
        out = tmp_path / f"{bias_mode}.onnx"
        runs.quantize(model, out, calibration={"x": X}, bias=bias_mode, activations=activations,
                           solver="rtn")
        y_float = make_session(model).run(None, {"x": X})[0]
        y_quant = make_session(onnx.load(out)).run(None, {"x": X})[0]
        assert y_quant.shape == y_float.shape == (1, 40, 5)


def test_nan_bias_skips_only_its_layer(tmp_path):
    model = mlp_model()
    bias = next(i for i in model.graph.initializer if i.name == "b1")
    values = numpy_helper.to_array(bias).copy()
    values[0] = np.inf
    bias.CopyFrom(numpy_helper.from_array(values, "b1"))
    report = runs.quantize(model, tmp_path / "o.onnx", calibration={"x": X}, bias="quantize", solver="rtn")
    assert [layer.name for layer in report.layers] == ["fc0"]
    assert report.skipped[0].name == "fc1" and "bias 'b1' holds NaN or Inf" in report.skipped[0].reason


def test_output_and_report_may_not_be_the_calibration_or_evaluation_file(tmp_path):
    model = mlp_dir(tmp_path)
    np.savez(tmp_path / "e.npz", x=X)
    for target in ("m.calib.npz", "e.npz"):
        for kwargs in ({"output_path": tmp_path / target}, {"output_path": tmp_path / "o.onnx",
                                                             "report_path": tmp_path / target}):
            with pytest.raises(OutputError, match="data file this run reads"):
                runs.quantize(model, evaluation=tmp_path / "e.npz", **kwargs)
    assert not (tmp_path / "o.onnx").exists()


def test_fixed_batch_model_calibrates_on_any_number_of_samples(tmp_path):
    model = fixed_batch_model(2)
    report = runs.quantize(model, tmp_path / "o.onnx", calibration={"x": X}, solver="rtn", batch_size=1)
    assert report.calibration_samples == 40 and report.evaluation.samples == 40
    one = fixed_batch_model(1)
    assert runs.quantize(one, tmp_path / "o1.onnx", calibration={"x": X[:7]}, solver="rtn").evaluation.samples == 7
    labels = np.arange(39) % 4
    report = runs.quantize(model, tmp_path / "o.onnx", calibration={"x": X[:39], "labels": labels},
                                solver="rtn")
    assert report.calibration_samples == 38 and report.evaluation.samples == 38
    assert "its first 38 of 39 samples: the model takes batches of exactly 2" in report.calibration
    with pytest.raises(DataError, match="exactly 2 samples.*there are only 1"):
        runs.quantize(model, tmp_path / "o.onnx", calibration={"x": X[:1]}, solver="rtn")


def test_output_name_of_255_characters_works(tmp_path):
    name = "o" * 250 + ".onnx"
    result = CliRunner().invoke(main, [str(mlp_dir(tmp_path)), str(tmp_path / name), "--solver", "rtn", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / name).is_file()


def test_long_layer_name_dumps_with_a_capped_stem(tmp_path):
    model = mlp_model()
    model.graph.node[0].name = "x" * 300
    runs.quantize(model, tmp_path / "o.onnx", calibration={"x": X}, solver="rtn", dump_qubo=tmp_path / "d")
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert len(index[0]["file"]) <= 120 and read_problem(tmp_path / "d" / index[0]["file"]).shape == (6, 8)
    assert file_stems(["a" * 300, "a" * 300]) == [file_stems(["a" * 300])[0], file_stems(["a" * 300])[0] + "_1"]


def test_error_or_interrupt_during_final_evaluation_leaves_no_output(tmp_path, monkeypatch):
    for failure in (QuboInputError("evaluation failed"), KeyboardInterrupt()):
        def fail(*args, failure=failure, **kwargs):
            raise failure
        monkeypatch.setattr(api, "evaluate", fail)
        with pytest.raises(type(failure)):
            runs.quantize(mlp_model(), tmp_path / "o.onnx", calibration={"x": X}, solver="rtn")
        assert list(tmp_path.iterdir()) == []


def test_sigterm_during_write_removes_the_temporary_file(tmp_path, monkeypatch):
    replace = os.replace

    def terminated(src, dst):
        os.kill(os.getpid(), signal.SIGTERM)
        replace(src, dst)
    monkeypatch.setattr(files.os, "replace", terminated)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(tmp_path / "o.onnx", b"data")
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_load_solution_reads_only_plain_names_inside_the_folder(tmp_path):
    runs.quantize(mlp_model(), tmp_path / "o.onnx", calibration={"x": X}, solver="rtn",
                       dump_qubo=tmp_path / "d")
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    for bad in ("/etc/passwd.qubo.npz", "../d/fc0.qubo.npz", "sub/fc0.qubo.npz", "fc0.npz", ".."):
        (tmp_path / "d" / "index.json").write_text(json.dumps([{**index[0], "file": bad}, index[1]]))
        with pytest.raises(DataError, match="only plain"):
            runs.quantize(mlp_model(), tmp_path / "o2.onnx", calibration={"x": X},
                               load_solution=tmp_path / "d")
    (tmp_path / "d" / "index.json").write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="must be a list"):
        runs.quantize(mlp_model(), tmp_path / "o2.onnx", calibration={"x": X}, load_solution=tmp_path / "d")


@pytest.mark.parametrize("bits", [2.5, "abc", "4", True, None, 0, 9])
def test_bits_must_be_an_integer_in_range(bits, tmp_path):
    with pytest.raises(OptionError, match="bits must be") as error:
        runs.quantize(mlp_model(), tmp_path / "o.onnx", calibration={"x": X}, bits=bits)
    assert error.value.options == ("bits",)


def test_read_problem_refuses_other_files(tmp_path):
    (tmp_path / "junk.qubo.npz").write_bytes(b"junk")
    np.savez(tmp_path / "other.qubo.npz", a=np.zeros(2))
    for name in ("junk.qubo.npz", "other.qubo.npz", "missing.qubo.npz"):
        with pytest.raises(DataError, match="is not a QUBO dump"):
            read_problem(tmp_path / name)


def test_weight_or_bias_that_is_a_graph_output_skips_only_that(tmp_path):
    model = mlp_model()
    model.graph.output.append(helper.make_tensor_value_info("W1", TensorProto.FLOAT, [4, 6]))
    model.graph.output.append(helper.make_tensor_value_info("b0", TensorProto.FLOAT, [6]))
    report = runs.quantize(model, tmp_path / "o.onnx", calibration={"x": X}, bias="quantize", solver="rtn")
    assert [layer.name for layer in report.layers] == ["fc0"] and report.layers[0].bias == "float"
    assert "graph output" in report.skipped[0].reason
    out = onnx.load(tmp_path / "o.onnx")
    results = make_session(out).run(None, {"x": X})
    expected = make_session(model).run(None, {"x": X})
    np.testing.assert_array_equal(results[1], expected[1])  # W1 as it was
    np.testing.assert_array_equal(results[2], expected[2])  # b0 as it was


def test_local_function_with_changed_ops_is_refused_in_one_line_or_raised(tmp_path):
    def model_with(op: str) -> onnx.ModelProto:
        function = helper.make_function("local", "Act", ["a"], ["b"], [helper.make_node(op, ["a"], ["b"])],
                                        opset_imports=[helper.make_opsetid("", 13)])
        model = mlp_model()
        model.graph.node[-1].output[0] = "pre"
        model.graph.node.append(helper.make_node("Act", ["pre"], ["y"], domain="local"))
        model.opset_import[0].version = 13
        model.opset_import.append(helper.make_opsetid("local", 1))
        model.functions.append(function)
        return model
    report = runs.quantize(model_with("Abs"), tmp_path / "abs.onnx", calibration={"x": X}, solver="rtn")
    assert len(report.layers) == 2  # Abs is the same at opset 25: the function's import is raised
    with pytest.raises(QuboInputError, match="local function 'local.Act' uses Relu"):
        runs.quantize(model_with("Relu"), tmp_path / "relu.onnx", calibration={"x": X}, solver="rtn")
    assert runs.quantize(model_with("Relu"), tmp_path / "relu8.onnx", calibration={"x": X}, bits=8,
                              solver="rtn").layers


def test_missing_external_data_is_a_model_error(tmp_path):
    model = _external(tmp_path, "gone.data")
    with pytest.raises(ModelError, match="gone.data"):
        files.load_model(model)


def test_a_time_major_output_is_evaluated_row_by_row(tmp_path):
    """A CRNN's output is [time, batch, classes]: over several batches it is joined as rows of its
    last axis, so every row of every sample is compared, not refused."""
    w = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="fc"),
         helper.make_node("Unsqueeze", ["h", "axes"], ["h3"]),
         helper.make_node("Tile", ["h3", "repeats"], ["y"])], "crnn-like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "B", 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([0], np.int64), "axes"),
         numpy_helper.from_array(np.array([3, 1, 1], np.int64), "repeats")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = runs.quantize(model, tmp_path / "q.onnx", calibration={"x": X}, batch_size=16, solver="rtn",
                                speed=False)
    assert report.evaluation.samples == 3 * len(X)  # rows: time steps x samples
    assert 0 < report.evaluation.relative_output_error < 0.5


def test_external_data_output_is_written_beside_the_model_and_loads(tmp_path):
    """--external-data: the tensors go to OUTPUT.data beside the model, both renamed into place
    from a temporary folder; the model loads in onnxruntime from its path and computes what the
    same quantization written in one file computes; the data file may not be a file the run reads."""
    import onnxruntime as ort

    model_path = Path(mlp_dir(tmp_path))
    one = runs.quantize(model_path, tmp_path / "one.onnx", solver="rtn", speed=False)
    two = runs.quantize(model_path, tmp_path / "ext.onnx", solver="rtn", speed=False, external_data=True)
    data = tmp_path / "ext.onnx.data"
    assert data.is_file() and two.output_bytes == (tmp_path / "ext.onnx").stat().st_size + data.stat().st_size
    session = ort.InferenceSession(str(tmp_path / "ext.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(tmp_path / "one.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": X})[0], reference.run(None, {"x": X})[0])
    assert one.evaluation.top1_agreement == two.evaluation.top1_agreement
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".oq-")]

    evaluation = tmp_path / "q.onnx.data"  # an evaluation file that the external data would replace
    with open(evaluation, "wb") as out:
        np.savez(out, x=X)
    before = evaluation.read_bytes()
    with pytest.raises(OutputError, match="external data '.*q.onnx.data' is a data file this run reads"):
        runs.quantize(model_path, tmp_path / "q.onnx", solver="rtn", speed=False, external_data=True,
                           evaluation=evaluation)
    assert evaluation.read_bytes() == before and not (tmp_path / "q.onnx").exists()


def test_report_may_not_be_the_external_data_file(tmp_path):
    model_path = Path(mlp_dir(tmp_path))
    with pytest.raises(OutputError, match="is a file the output model is written to"):
        runs.quantize(model_path, tmp_path / "o.onnx", solver="rtn", speed=False, external_data=True,
                           report_path=tmp_path / "o.onnx.data")
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o.onnx.data").exists()
