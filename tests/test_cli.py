"""The command line through click's CliRunner, including every bad-input case: one clear line,
a non-zero exit, the input untouched and no output file left behind."""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import runs
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo import QuboInputError
from onnx_qubo.cli import main

from graphs import gemm_model, mlp_model


@pytest.fixture
def model_dir(tmp_path):
    """mlp.onnx with mlp.calib.npz beside it, as the README's demo is laid out."""
    onnx.save(mlp_model(), tmp_path / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    np.savez(tmp_path / "mlp.calib.npz", x=x)
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_quantize_uses_calibration_beside_the_model_and_writes_report(model_dir):
    result = invoke(model_dir / "mlp.onnx", model_dir / "out.onnx", "--bits", "2", "--solver", "rtn",
                    "--report", model_dir / "report.json", "--quiet")
    assert result.exit_code == 0, result.output
    assert "fc0" in result.output and "INT2" in result.output and "same predictions" in result.output
    report = json.loads((model_dir / "report.json").read_text())
    assert report["bits"] == 2 and len(report["layers"]) == 2
    assert report["calibration"].endswith("mlp.calib.npz")
    onnx.checker.check_model(onnx.load(model_dir / "out.onnx"), full_check=True)


def test_explicit_quantize_subcommand_and_neal_flags(model_dir):
    result = invoke("quantize", model_dir / "mlp.onnx", model_dir / "out.onnx", "--bits", "4", "--solver", "neal",
                    "--neal-reads", "2", "--neal-sweeps", "100", "--scale", "minmax", "--quiet")
    assert result.exit_code == 0, result.output
    assert "solver=neal" in result.output and "INT4" in result.output


def test_neal_flags_without_neal_are_refused(model_dir):
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", "--neal-reads", "3"],
                 "--neal-reads applies only to --solver neal")  # a bad value, refused by the config: status 1


def test_a_padding_mask_the_model_does_not_take_is_refused(model_dir):
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", "--padding-mask", "attention_mask"],
                 "--padding-mask 'attention_mask' is not an input of the model (its inputs: x)")


@pytest.mark.parametrize("args, message", [
    (["--solver", "neal", "--effort", "4"], "--effort applies only to --solver fast"),
    (["--effort", "0"], "--effort must be at least 1, got 0")])
def test_effort_outside_the_fast_solver_or_below_1_is_refused(model_dir, args, message):
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", *args], message)


def test_inspect_lists_layers_and_skipped_nodes(model_dir):
    result = invoke("inspect", model_dir / "mlp.onnx")
    assert result.exit_code == 0
    assert "2 dense layer(s)" in result.output and "fc0" in result.output and "out=6" in result.output


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_damping_auto_reports_each_layers_ridge_and_a_word_is_refused(model_dir):
    """--damping auto: the report's notes give the range of the ridges it chose, its layer rows
    each one's (the calibration file's 40 rows are 40 samples: a spread to measure)."""
    result = invoke(model_dir / "mlp.onnx", model_dir / "out.onnx", "--bits", "2", "--damping", "auto",
                    "--report", model_dir / "report.json", "--quiet")
    assert result.exit_code == 0, result.output
    assert "--damping auto: ridges of" in result.output and "Ledoit-Wolf" in result.output
    report = json.loads((model_dir / "report.json").read_text())
    assert all(layer["damping"] > 0 for layer in report["layers"])
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "other.onnx", "--damping", "some"],
                 "'some' is neither a number nor auto", output_name="other.onnx", status=2)


def expect_error(model_dir, args, message, output_name="out.onnx", status=1):
    """One line naming the problem, the exit status of its kind (1 bad input, 2 malformed flag,
    3 a solver's limit), the input untouched and nothing written."""
    before = digest(model_dir / "mlp.onnx")
    result = invoke(*args)
    assert result.exit_code == status, result.output
    assert message in result.output, result.output
    assert digest(model_dir / "mlp.onnx") == before
    assert not (model_dir / output_name).exists()
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]


def test_not_an_onnx_file(model_dir):
    (model_dir / "junk.onnx").write_bytes(b"\x00\xffnot a model")
    expect_error(model_dir, [model_dir / "junk.onnx", model_dir / "out.onnx", "--calib", model_dir / "mlp.calib.npz"],
                 "is not a readable ONNX model")


def test_missing_model_file(model_dir):
    expect_error(model_dir, [model_dir / "nope.onnx", model_dir / "out.onnx"], "does not exist")


def test_a_word_that_is_no_command_nor_file_names_the_commands(model_dir):
    result = CliRunner().invoke(main, ["layers", str(model_dir / "mlp.onnx")])
    assert result.exit_code == 2
    assert "no command 'layers' (commands: " in result.output and "inspect" in result.output
    assert not (model_dir / "mlp.onnx").with_name("layers").exists()


def test_no_dense_layers(model_dir):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])])
    onnx.save(helper.make_model(graph), model_dir / "relu.onnx")
    expect_error(model_dir, [model_dir / "relu.onnx", model_dir / "out.onnx", "--calib", model_dir / "mlp.calib.npz"],
                 "no quantizable dense layers")


def test_no_calibration_data_says_how_to_provide_it(model_dir):
    (model_dir / "mlp.calib.npz").unlink()
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx"], "no calibration data: give --calib")


@pytest.mark.parametrize("arrays,message", [
    ({"wrong": np.zeros((4, 8), np.float32), "other": np.zeros(4)}, "missing ['x']"),
    ({"x": np.zeros((4, 7), np.float32)}, "axis 1 differs"),
    ({"x": np.zeros((4, 8, 1), np.float32)}, "expects rank 2"),
    ({"x": np.zeros((4, 8), np.complex64)}, "has dtype complex64"),
    ({"x": np.full((4, 8), np.nan, np.float32)}, "contains NaN or Inf"),
    ({"x": np.zeros((4, 8), np.float32), "labels": np.zeros(3, np.int64)}, "'labels' must hold"),
])
def test_bad_calibration_data(model_dir, arrays, message):
    np.savez(model_dir / "bad.npz", **arrays)
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", "--calib", model_dir / "bad.npz"],
                 message)


def test_unnamed_single_array_is_accepted_for_a_single_input_model(model_dir):
    np.savez(model_dir / "plain.npz", np.ones((10, 8), np.float32))
    result = invoke(model_dir / "mlp.onnx", model_dir / "out.onnx", "--calib", model_dir / "plain.npz",
                    "--solver", "rtn", "--quiet")
    assert result.exit_code == 0, result.output


def test_nan_in_weights_names_the_initializer(model_dir):
    model = mlp_model()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0] = np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W0"))
    onnx.save(model, model_dir / "mlp.onnx")
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx"],
                 "weight 'W0' of layer 'fc0' holds NaN or Inf")


@pytest.mark.parametrize("bits", ["0", "9"])
def test_bits_out_of_range(model_dir, bits):
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", "--bits", bits],
                 "--bits must be between 1 and 8")


def test_output_equal_to_input_is_refused(model_dir):
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "mlp.onnx"], "is the input model",
                 output_name="never")


def test_unwritable_output_locations(model_dir):
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "no_such_dir" / "out.onnx"], "does not exist")
    (model_dir / "a_dir").mkdir()
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "a_dir"], "is a directory")


def test_exact_solver_on_too_wide_layer_fails_cleanly(model_dir):
    onnx.save(gemm_model(f=50, n=3), model_dir / "wide.onnx")
    np.savez(model_dir / "wide.calib.npz", x=np.random.default_rng(0).standard_normal((20, 50)).astype(np.float32))
    expect_error(model_dir, [model_dir / "wide.onnx", model_dir / "out.onnx", "--solver", "exact", "--scale", "minmax"],
                 "at most 40 free weights", status=3)


def test_existing_output_is_replaced_only_on_success(model_dir):
    (model_dir / "out.onnx").write_bytes(b"previous")
    np.savez(model_dir / "bad.npz", x=np.zeros((4, 7), np.float32))
    result = invoke(model_dir / "mlp.onnx", model_dir / "out.onnx", "--calib", model_dir / "bad.npz")
    assert result.exit_code != 0
    assert (model_dir / "out.onnx").read_bytes() == b"previous"


TWO_BITS = (TensorProto.INT2, TensorProto.UINT2)  # each layer's grid is its own choice


@pytest.mark.slow
def test_exclude_leaves_a_layer_in_float_and_layer_bits_mixes_precision(model_dir):
    result = invoke(model_dir / "mlp.onnx", model_dir / "out.onnx", "--exclude", "fc1", "--quiet")
    assert result.exit_code == 0, result.output
    assert "skipped Gemm 'fc1': excluded on request" in result.output
    inits = {i.name: i.data_type for i in onnx.load(model_dir / "out.onnx").graph.initializer}
    assert inits["W1"] == TensorProto.FLOAT and inits["W0_quantized"] in TWO_BITS

    result = invoke(model_dir / "mlp.onnx", model_dir / "out.onnx", "--layer-bits", "fc1=4", "--quiet",
                    "--report", model_dir / "r.json")
    assert result.exit_code == 0, result.output
    inits = {i.name: i.data_type for i in onnx.load(model_dir / "out.onnx").graph.initializer}
    assert inits["W0_quantized"] in TWO_BITS and inits["W1_quantized"] in (TensorProto.INT4, TensorProto.UINT4)
    assert [layer["bits"] for layer in json.loads((model_dir / "r.json").read_text())["layers"]] == [2, 4]


@pytest.mark.parametrize("args,message,status", [
    (["--exclude", "nope"], "--exclude names no dense layer: nope", 1),
    (["--exclude", "fc0", "--exclude", "fc1"], "no quantizable dense layers", 1),
    (["--layer-bits", "fc1"], "expected LAYER=BITS", 2),
    (["--layer-bits", "nope=4"], "--layer-bits names no quantized dense layer: nope", 1),
    (["--layer-bits", "fc1=9"], "--layer-bits must be between 1 and 8", 1),
])
def test_bad_per_layer_flags(model_dir, args, message, status):
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", *args], message, status=status)


def test_report_on_the_output_path_and_dump_onto_a_file_are_refused(model_dir):
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", "--report", model_dir / "out.onnx"],
                 "is a file the output model is written to")
    (model_dir / "afile").write_text("x")
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", "--dump-qubo", model_dir / "afile"],
                 "is a file", status=2)
    with pytest.raises(QuboInputError, match="exists and is not a directory"):
        runs.quantize(model_dir / "mlp.onnx", model_dir / "out.onnx", dump_qubo=model_dir / "afile")


@pytest.mark.parametrize("args,message,status", [
    (["--block-size", "4"], "--block-size goes with --granularity block", 1),
    (["--granularity", "block"], "--granularity block needs it", 1),
    (["--bias", "int32"], "--bias int32 needs quantized inputs (--activations int8 or uint8)", 1),
    (["--bias", "quantize", "--bias-correction"], "with --bias quantize the bias is already a variable", 1),
    (["--asymmetric", "--activations", "uint8"], "onnxruntime 1.32 fuses them into QGemm", 1),
    (["--activations", "int4"], "Invalid value for '--activations'", 2),
])
def test_bad_scheme_flags(model_dir, args, message, status):
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", *args], message, status=status)


@pytest.mark.slow
def test_scheme_flags_reach_the_graph_and_the_report(model_dir):
    result = invoke(model_dir / "mlp.onnx", model_dir / "out.onnx", "--bits", "4", "--granularity", "block",
                    "--block-size", "4", "--asymmetric", "--activations", "uint8", "--bias", "quantize",
                    "--sequential", "--quiet")
    assert result.exit_code == 0, result.output
    assert "weights blocks of 4 inputs, asymmetric (zero points); bias quantize; activations uint8" in result.output
    assert "sequential calibration" in result.output
    model = onnx.load(model_dir / "out.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["W0_quantized"].data_type == TensorProto.UINT4
    assert list(inits["W0_scale"].dims) == [6, 2]  # 8 inputs in blocks of 4
    assert inits["b0_quantized"].data_type == TensorProto.UINT4
    weight_dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "W0_quantized")
    assert {a.name: helper.get_attribute_value(a) for a in weight_dq.attribute} == {"axis": 1, "block_size": 4}
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 2  # one per layer input


def test_an_unreachable_ray_cluster_is_one_line_before_any_work(model_dir):
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", "--ray", "127.0.0.1:1"],
                 "--ray '127.0.0.1:1': cannot reach the Ray cluster within 5 s")


def test_saved_config_reproduces_the_run_byte_for_byte(model_dir):
    """Flags + --save-config, then --config alone: the same output bytes; a flag given overrides the file."""
    flags = ["--bits", "3", "--granularity", "block", "--block-size", "4", "--asymmetric", "--solver", "neal",
             "--neal-reads", "2", "--seed", "5", "--bias", "quantize"]
    first = invoke(model_dir / "mlp.onnx", model_dir / "a.onnx", *flags, "--save-config", model_dir / "c.json",
                   "--quiet", "--no-speed")
    assert first.exit_code == 0, first.output
    second = invoke(model_dir / "mlp.onnx", model_dir / "b.onnx", "--config", model_dir / "c.json", "--quiet",
                    "--no-speed")
    assert second.exit_code == 0, second.output
    assert (model_dir / "a.onnx").read_bytes() == (model_dir / "b.onnx").read_bytes()
    assert json.loads((model_dir / "c.json").read_text())["weights"]["granularity"] == {"block": 4}
    third = invoke(model_dir / "mlp.onnx", model_dir / "c.onnx", "--config", model_dir / "c.json", "--bits", "2",
                   "--quiet", "--no-speed")
    assert third.exit_code == 0 and "bits=2" in third.output and "blocks of 4 inputs" in third.output


def test_bad_config_file_is_refused_naming_the_key(model_dir):
    (model_dir / "c.json").write_text('{"weights": {"bits": 12}}')
    expect_error(model_dir, [model_dir / "mlp.onnx", model_dir / "out.onnx", "--config", model_dir / "c.json"],
                 "weights.bits must be between 1 and 8, got 12")


def test_the_cli_reference_in_docs_is_generated_from_the_cli():
    """docs/cli.md is benchmarks/cli_reference.py's output: regenerate it when a flag changes."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("cli_reference", root / "benchmarks" / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "cli.md").read_text() == module.render(), \
        "docs/cli.md is stale: python benchmarks/cli_reference.py > docs/cli.md"
