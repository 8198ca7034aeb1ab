"""More bad inputs refused in one line with exit status 1 (2 for a malformed flag), no
traceback, nothing written: onnxruntime failing on the caller's model, hostile .npz files, broken
external-data metadata, initializers whose data do not fit their dims, absurd memory amounts, a
model input without a shape, option combinations blamed on the right flag, empty lists, 2-D
labels. ``BAD_INPUTS`` joins tests/test_refusals.py's table in docs/bad_inputs.md
(benchmarks/bad_inputs.py)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import runs
from onnx import TensorProto, helper, numpy_helper
from test_refusals import BadInput, X, assert_refused, mlp_dir

import onnx_qubo
from onnx_qubo.core.errors import DataError, ModelError, OptionError

from graphs import mlp_model

RNG = np.random.default_rng(0)


def _model(nodes, inputs, inits, rank: int) -> onnx.ModelProto:
    """A model as a user may bring it (output 'y' of ``rank``): not passed through onnx's checker."""
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", *[None] * (rank - 1)])
    graph = helper.make_graph(nodes, "g", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _conv(folder: Path, group: int = 1, kernel: int = 3, relu_first: bool = False) -> list[str]:
    """x [B, 3, 6, 6] (-> Relu) -> Conv(W [4, 3 // group or 1, k, k], group)."""
    weight = RNG.standard_normal((4, max(3 // group, 1), kernel, kernel)).astype(np.float32)
    source = "r" if relu_first else "x"
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")] if relu_first else []
    nodes.append(helper.make_node("Conv", [source, "W"], ["y"], group=group, name="conv"))
    spatial = [6, 6] if group > 1 else ["H", "W"]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, *spatial])],
                   [numpy_helper.from_array(weight, "W")], rank=4)
    onnx.save(model, folder / "m.onnx")
    np.savez(folder / "m.calib.npz", x=RNG.standard_normal((8, 3, 6, 6)).astype(np.float32))
    return [folder / "m.onnx", folder / "out.onnx", "--solver", "rtn"]


def _gather(folder: Path) -> list[str]:
    """x [B, 8] -> Gather(axis 1, indices [0, 3, 11]) -> Gemm: index 11 is past the 8 columns."""
    model = _model([helper.make_node("Gather", ["x", "idx"], ["g"], axis=1, name="pick"),
                    helper.make_node("Gemm", ["g", "W"], ["y"], transB=1, name="fc")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
                   [numpy_helper.from_array(np.array([0, 3, 11], np.int64), "idx"),
                    numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "W")], rank=2)
    return [mlp_dir(folder, model), folder / "out.onnx", "--solver", "rtn"]


def _corrupt_deflate(folder: Path) -> list[str]:
    np.savez_compressed(folder / "c.npz", x=X)
    raw = bytearray((folder / "c.npz").read_bytes())
    for k in range(60, 200):  # inside the deflate stream of 'x.npy'
        raw[k] ^= 0x5A
    (folder / "c.npz").write_bytes(bytes(raw))
    return [mlp_dir(folder), folder / "out.onnx", "--calib", folder / "c.npz"]


def _unknown_compression(folder: Path) -> list[str]:
    np.savez(folder / "c.npz", x=X)
    raw = bytearray((folder / "c.npz").read_bytes())
    raw[8:10] = (99).to_bytes(2, "little")  # the local header's compression method
    directory = raw.rfind(b"PK\x01\x02")
    raw[directory + 10:directory + 12] = (99).to_bytes(2, "little")  # and the central directory's
    (folder / "c.npz").write_bytes(bytes(raw))
    return [mlp_dir(folder), folder / "out.onnx", "--calib", folder / "c.npz"]


def _huge_declaration(folder: Path) -> list[str]:
    """A 1 KB archive whose array header declares [2^40, 1] float32: 4 TiB."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2 ** 40, 1)})
    with zipfile.ZipFile(folder / "c.npz", "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(1024))
    return [mlp_dir(folder), folder / "out.onnx", "--calib", folder / "c.npz"]


def _external_entry(folder: Path, key: str, value: str) -> list[str]:
    """The external-data model of mlp_dir with ``key`` of its first tensor's entry set to ``value``."""
    path = mlp_dir(folder, external=True)
    model = onnx.load(path, load_external_data=False)
    entries = {entry.key: entry for entry in model.graph.initializer[0].external_data}
    if key in entries:
        entries[key].value = value
    else:
        model.graph.initializer[0].external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())
    return [path, folder / "out.onnx", "--solver", "rtn"]


def _dims_mismatch(folder: Path) -> list[str]:
    model = mlp_model()
    model.graph.initializer[0].dims[0] = 7  # W0 holds 6 x 8 values
    return [mlp_dir(folder, model), folder / "out.onnx", "--solver", "rtn"]


def _no_input_shape(folder: Path) -> list[str]:
    model = mlp_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    return [mlp_dir(folder, model), folder / "out.onnx", "--solver", "rtn"]


def _labels_2d(folder: Path) -> list[str]:
    np.savez(folder / "e.npz", x=X, labels=np.zeros((len(X), 2), np.int64))
    return [mlp_dir(folder), folder / "out.onnx", "--solver", "rtn", "--eval", folder / "e.npz"]


BAD_INPUTS = [
    BadInput("Conv group does not divide the input's channels", lambda d: _conv(d, group=2),
             "Conv 'conv' cannot run on its input"),
    BadInput("Conv kernel larger than its input", lambda d: _conv(d, kernel=9), "smaller than the dilated kernel"),
    BadInput("Conv group mismatch after a Relu (found on the captured input)",
             lambda d: _conv(d, group=2, relu_first=True),
             "Conv 'conv' cannot run on its input: input shape (1, 3, 6, 6)"),
    BadInput("Gather indices out of range", _gather, "onnxruntime cannot run the float model on DIR/m.calib.npz: "
             "node 'pick' (Gather)"),
    BadInput("`--calib` with a corrupt deflate stream", _corrupt_deflate, "array 'x' cannot be read"),
    BadInput("`--calib` with an unknown compression method", _unknown_compression,
             "That compression method is not supported"),
    BadInput("`--calib` of 1 KB declaring a 4 TiB array", _huge_declaration,
             "declares shape (1099511627776, 1) of float32 (4,398,046,511,104 bytes)"),
    BadInput("external data offset negative", lambda d: _external_entry(d, "offset", "-8"),
             "tensor 'W0': its external data offset '-8' is not a non-negative integer"),
    BadInput("external data offset not a number", lambda d: _external_entry(d, "offset", "abc"),
             "tensor 'W0': its external data offset 'abc'"),
    BadInput("external data length too short", lambda d: _external_entry(d, "length", "4"),
             "tensor 'W0': its external data length is 4 bytes, but its dims [6, 8] take 192"),
    BadInput("initializer dims do not match its data", _dims_mismatch,
             "tensor 'W0' holds values that do not fit its dims [7, 8]"),
    BadInput("`--max-memory 1e300`", lambda d: [mlp_dir(d), d / "out.onnx", "--max-memory", "1e300"],
             "--max-memory must be a positive number of GB up to 1e+09"),
    BadInput("`--size-budget 1e303`", lambda d: [mlp_dir(d), d / "out.onnx", "--size-budget", "1e303"],
             "--size-budget must be a number of MB above 0 up to 1e+12"),
    BadInput("model input without a shape", _no_input_shape, "model input 'x' declares no shape"),
    BadInput("`--ort-accuracy-level 4 --format qdq`",
             lambda d: [mlp_dir(d), d / "out.onnx", "--ort-accuracy-level", "4", "--format", "qdq"],
             "--ort-accuracy-level applies to --format ort weight-only layers (MatMulNBits), not to --format qdq"),
    BadInput("`compare --bits ,`", lambda d: ["compare", mlp_dir(d), "--bits", ","],
             "expected comma-separated integers", 2),
    BadInput("2-D `labels`", _labels_2d, "'labels' must hold one integer class per sample, a 1-D array of 40"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.title for c in BAD_INPUTS])
def test_bad_input_is_refused_in_one_line_and_nothing_changes(case, tmp_path):
    assert_refused(case, tmp_path)


def test_accuracy_level_names_only_the_option_at_fault(tmp_path):
    model = mlp_dir(tmp_path)
    with pytest.raises(OptionError) as refused:
        runs.quantize(model, tmp_path / "o.onnx", ort_accuracy_level=4, format="qdq")
    assert set(refused.value.options) == {"ort_accuracy_level", "format"}
    with pytest.raises(OptionError) as refused:
        runs.quantize(model, tmp_path / "o.onnx", ort_accuracy_level=4, format="ort", activations="int8")
    assert set(refused.value.options) == {"ort_accuracy_level", "activations"}


@pytest.mark.parametrize("options", [dict(max_memory=10 ** 400), dict(max_memory=1e300), dict(size_budget=10 ** 400),
                                     dict(size_budget=float("nan"))])
def test_api_refuses_amounts_past_any_machine(options, tmp_path):
    with pytest.raises(OptionError, match=next(iter(options))):
        runs.quantize(mlp_dir(tmp_path), tmp_path / "o.onnx", **options)


@pytest.mark.parametrize("option", ["bits", "scales", "solvers"])
def test_api_compare_refuses_an_empty_list(option, tmp_path):
    with pytest.raises(OptionError, match=f"{option} names none"):
        onnx_qubo.compare(mlp_dir(tmp_path), **{option: []})


def test_api_refuses_2d_labels_and_bad_npz_with_data_errors(tmp_path):
    with pytest.raises(DataError, match="1-D"):
        runs.quantize(mlp_model(), tmp_path / "o.onnx", calibration={"x": X},
                           evaluation={"x": X, "labels": np.zeros((len(X), 1), np.int64)})
    _huge_declaration(tmp_path)
    with pytest.raises(DataError, match="c.npz', array 'x' declares"):
        runs.quantize(mlp_model(), tmp_path / "o.onnx", calibration=tmp_path / "c.npz")


def test_a_model_without_an_input_shape_is_a_model_error_naming_it(tmp_path):
    model = mlp_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(ModelError, match="input 'x' declares no shape"):
        runs.quantize(model, tmp_path / "o.onnx", calibration={"x": X})
