"""``rotate="hadamard"`` (incoherence processing, rotation.py + passes/rotate.py) end to end: the
rotated float model computes the original's outputs (the genai tiny LM included) at every
onnxruntime level; the cost the report states for a rotated layer is still the output error
measured in onnxruntime; both formats emit and run, the fast one against the portable model of the
same codes run unoptimized; a bad block size is refused in one line."""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data
from runs import quantize
from test_conv import conv_model, measured_error

from onnx_qubo import OptionError
from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.cli import main
from onnx_qubo.core.options import Rotation
from onnx_qubo.graph.files import load_model
from onnx_qubo.graph.runtime import make_session
from onnx_qubo.model.rotation import normalized_layer, rotate
from onnx_qubo.passes import RaiseOpset, online_rotations
from onnx_qubo.pipeline import prepare

from graphs import gemm_model, layernorm_model, matmul_model, mlp_model

LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          ort.GraphOptimizationLevel.ORT_DISABLE_ALL]
TINY_LM = Path(__file__).resolve().parents[1] / "models" / "tiny_lm" / "model.onnx"


def run(model: onnx.ModelProto, x: np.ndarray, level=LEVELS[0]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.float64)


@pytest.mark.parametrize("residual", [False, True], ids=["per-input", "residual"])
@pytest.mark.parametrize("rotation", [Rotation.HADAMARD, Rotation.WHOLE])
def test_the_rotated_tiny_language_model_computes_the_same_logits_at_every_level(rotation, residual):
    model = prepare(load_model(TINY_LM))
    rotated = rotate(model, rotation, 32, seed=0, residual=residual)
    online = [n for n in rotated.graph.node if n.name in online_rotations(rotated) and n.op_type == "MatMul"]
    # per block: qkv, o, gate and up, down; the head. With the residual stream turned as one: per block
    # the o and down projections' inputs, and the embedding's rows
    assert len(online) == (5 if residual else 9) * (1 + (rotation == Rotation.WHOLE))
    gains = {n.input[1 if n.op_type == "SimplifiedLayerNormalization" else 2] for n in rotated.graph.node
             if n.op_type.endswith("SimplifiedLayerNormalization")}  # moved into the layers reading them, or kept
    assert len(gains) == (1 if residual else 5)
    if residual:
        assert [np.array_equal(numpy_helper.to_array(i), np.ones(64, np.float32))
                for i in rotated.graph.initializer if i.name in gains] == [True]
    tokens = np.load(TINY_LM.with_name("model.eval.npz"))["input_ids"][:3, :32]
    feeds = load_dataset({"input_ids": tokens}, model).batches[0]
    for level in LEVELS:
        original = make_session(model, level).run(["logits"], feeds)[0]
        turned = make_session(rotated, level).run(["logits"], feeds)[0]
        np.testing.assert_allclose(turned, original, atol=1e-4 * float(np.abs(original).max()))


def test_a_rotated_language_model_raised_to_a_new_opset_still_tells_its_kv_cache_shape():
    """The whole-width rotation's Reshape hides the hidden size from shape inference. Raising the
    opset (for INT2 codes) let the converter write that shapeless type over the projections'
    declared shapes, and inference's shapeless types replaced declared ones: the file alone then no
    longer told its KV cache's head size (SmolLM2's 2-bit cells could not be evaluated from their
    files). Both keep the declarations now."""
    model = prepare(load_model(TINY_LM))
    raised = RaiseOpset(25).call(rotate(model, Rotation.WHOLE, 32, seed=0)).model
    tokens = np.load(TINY_LM.with_name("model.eval.npz"))["input_ids"][:2, :8]
    feeds = load_dataset({"input_ids": tokens}, raised).batches[0]
    pasts = [name for name in feeds if name.startswith("past_key_values")]
    assert pasts and all(feeds[name].shape[2:] == (0, 16) for name in pasts)


MODELS = {
    "gemm": lambda: gemm_model(f=32, n=7, trans_b=0, alpha=-0.7, beta=0.5, relu=False),
    "matmul-3d": lambda: matmul_model(f=32, n=7, bias=True, leading=(3,)),
}


@pytest.mark.parametrize("scheme", [dict(bits=2), dict(bits=3, granularity="block", block_size=8, symmetric=False)],
                         ids=["int2-channel", "uint3-block8"])
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("rotation", ["hadamard", "whole"])
@pytest.mark.slow
def test_the_reported_cost_of_a_rotated_layer_is_its_measured_output_error(model_name, scheme, rotation, tmp_path):
    model = MODELS[model_name]()
    shape = (300, 32) if model_name == "gemm" else (100, 3, 32)
    x = (np.random.default_rng(1).standard_normal(shape) + 0.3).astype(np.float32)
    out = tmp_path / "q.onnx"
    report = quantize(model, out, calibration={"x": x}, batch_size=64, rotate=rotation, rotate_block=16,
                      speed=False, **scheme)
    written = onnx.load(out)
    online = [n for n in written.graph.node if "rotated" in n.name and n.op_type == "MatMul"]
    assert len(online) == 1 + (rotation == "whole")  # the online transform: 32 = 2 x 16 whole
    assert len(report.layers) == 1 and report.skipped == [] and "inputs rotated" in report.scheme
    y_float, y_quant = run(model, x), run(written, x)
    measured = float(((y_quant - y_float) ** 2).reshape(-1, y_float.shape[-1]).sum(axis=1).mean())
    assert report.layers[0].final_cost == pytest.approx(measured, rel=1e-3)


@pytest.mark.parametrize("scheme", [dict(bits=4, rotate="hadamard"),
                                    dict(bits=2, granularity="block", block_size=16, rotate="hadamard"),
                                    dict(bits=3, granularity="block", block_size=16, rotate="whole", rotate_block=8)],
                         ids=["int4-channel", "int2-block16", "int3-block16-whole"])
@pytest.mark.slow
def test_both_formats_emit_and_run_the_same_codes(scheme, tmp_path):
    model = mlp_model(widths=(64, 32, 16))
    x = (np.random.default_rng(2).standard_normal((128, 64)) + 0.2).astype(np.float32)
    common = dict(calibration={"x": x}, speed=False, **scheme)
    portable = quantize(model, tmp_path / "qdq.onnx", **common)
    fast = quantize(model, tmp_path / "ort.onnx", format="ort", ort_accuracy_level=0, **common)  # float compute
    assert [layer.kernel for layer in fast.layers] == ["MatMulNBits"] * 2
    assert [layer.cost_solved for layer in fast.layers] == [layer.cost_solved for layer in portable.layers]
    reference = run(onnx.load(tmp_path / "qdq.onnx"), x, LEVELS[-1])  # DequantizeLinear, no rewrites
    for path in ("qdq.onnx", "ort.onnx"):
        written = onnx.load(tmp_path / path)
        for level in LEVELS:
            y = run(written, x, level)
            assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 1e-3, (path, level)
    assert fast.evaluation.default_vs_unoptimized < 1e-3 and fast.evaluation.basic_vs_unoptimized < 1e-3


CONVS = {
    "2d-stride-pad": lambda: conv_model(channels=(32, 6), strides=[2, 1], pads=[1, 0, 1, 2]),
    "1d": lambda: conv_model(spatial=(20,), channels=(32, 6), kernel=(5,), strides=[3], pads=[2, 2]),
}


@pytest.mark.parametrize("model_name", CONVS)
@pytest.mark.parametrize("rotation", ["hadamard", "whole"])
@pytest.mark.slow
def test_a_rotated_conv_layers_cost_is_its_measured_output_error_at_every_level(model_name, rotation, tmp_path):
    model = CONVS[model_name]()
    shape = [d.dim_value or 24 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = (np.random.default_rng(4).standard_normal(shape) + 0.3).astype(np.float32)
    report = quantize(model, tmp_path / "q.onnx", bits=3, granularity="block", block_size=16, symmetric=False,
                      calibration={"x": x}, rotate=rotation, rotate_block=16, rotate_convs=True, speed=False)
    written = onnx.load(tmp_path / "q.onnx")
    online = [n for n in written.graph.node if "rotated" in n.name and n.op_type == "MatMul"]
    assert len(online) == 1 + (rotation == "whole")  # 32 channels = 2 x 16 whole
    assert [layer.name for layer in report.layers] == ["conv"] and "Conv input channels too" in report.scheme
    assert report.layers[0].final_cost == pytest.approx(measured_error(model, written, x), rel=1e-3)
    reference = run(written, x, LEVELS[-1])
    for level in LEVELS[:2]:
        np.testing.assert_allclose(run(written, x, level), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option", ["rotate_convs", "rotate_residual"])
def test_rotating_conv_channels_or_the_residual_stream_needs_a_rotation(option, tmp_path):
    model = conv_model(channels=(32, 6))
    x = np.zeros((4, 32, 9, 8), np.float32)
    with pytest.raises(OptionError, match=f"{option} rotates with rotate"):
        quantize(model, tmp_path / "q.onnx", calibration={"x": x}, rotate="none", **{option: True})
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "m.calib.npz", x=x)
    flag = "--" + option.replace("_", "-")
    result = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"), flag])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {flag} rotates with --rotate, which is none for this model by "
                                     "default: give --rotate hadamard or whole")
    assert not (tmp_path / "out.onnx").exists()


def test_rotation_spreads_an_outlier_weight_and_lowers_the_2_bit_error(tmp_path):
    """One large weight per row makes a per-row 2-bit grid coarse for the rest; rotated, the row's
    energy is spread over its block and the same grid serves it better."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    w[rng.integers(0, 32, 8), np.arange(8)] = 12.0
    model = matmul_model(f=32, n=8, bias=False)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    x = rng.standard_normal((256, 32)).astype(np.float32)
    errors = {}
    for rotation in ("none", "hadamard"):
        out = tmp_path / f"{rotation}.onnx"
        quantize(model, out, bits=2, calibration={"x": x}, rotate=rotation, rotate_block=32, speed=False)
        errors[rotation] = float(((run(onnx.load(out), x) - run(model, x)) ** 2).sum(axis=1).mean())
    assert errors["hadamard"] < 0.7 * errors["none"], errors  # about half here


def test_a_block_that_is_not_a_power_of_two_is_refused_in_one_line(tmp_path):
    model = matmul_model(f=32, n=4)
    x = np.zeros((8, 32), np.float32)
    with pytest.raises(OptionError, match="rotate_block"):
        quantize(model, tmp_path / "q.onnx", calibration={"x": x}, rotate="hadamard", rotate_block=48)
    with pytest.raises(OptionError, match="rotate must be one of auto, none, hadamard, whole"):
        quantize(model, tmp_path / "q.onnx", calibration={"x": x}, rotate="givens")
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "m.calib.npz", x=x)
    result = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"), "--rotate", "hadamard",
                                       "--rotate-block", "48"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --rotate-block must be a power of two, at least 2, got 48"
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("format", ["qdq", "ort"])
@pytest.mark.slow
def test_a_rotated_run_writes_a_self_contained_model_and_leaves_no_temporary_file(format, tmp_path, monkeypatch):
    """The rotated model's weights live in a temporary folder while the run uses them
    (rotation.py): the output holds its float tensors itself (here an excluded layer's rotated
    weight), is the same from a model in memory or in external data files, and the folder is gone."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    model = mlp_model(widths=(64, 32, 16))
    x = (np.random.default_rng(3).standard_normal((128, 64)) + 0.2).astype(np.float32)
    onnx.save(mlp_model(widths=(64, 32, 16)), tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    common = dict(calibration={"x": x}, speed=False, rotate="hadamard", exclude=("fc1",), bits=8,
                  format=format)
    for source, out in ((model, "memory.onnx"), (tmp_path / "m.onnx", "file.onnx")):
        report = quantize(source, tmp_path / out, **common)
        assert [layer.name for layer in report.layers] == ["fc0"]
        assert list(temporary.iterdir()) == []
    assert (tmp_path / "memory.onnx").read_bytes() == (tmp_path / "file.onnx").read_bytes()
    file = onnx.load(tmp_path / "file.onnx", load_external_data=False)
    assert not any(uses_external_data(init) for init in file.graph.initializer)
    excluded = next(numpy_helper.to_array(i) for i in file.graph.initializer if i.name == "W1")
    original = numpy_helper.to_array(model.graph.initializer[2])
    assert excluded.dtype == np.float32 and not np.array_equal(excluded, original)  # rotated, kept float
    float_output = run(model, x)
    assert np.linalg.norm(run(file, x) - float_output) < 0.01 * np.linalg.norm(float_output)  # from the file alone


def test_a_layer_reading_a_layernorm_marks_a_transformer():
    """normalized_layer: the first MatMul/Gemm with a constant weight reading a LayerNorm/RMSNorm
    (onnxruntime's fused ones too); a plain MLP or Conv network has none."""
    model = layernorm_model()
    assert normalized_layer(model) == "up"
    assert normalized_layer(load_model(TINY_LM)) is not None  # SkipSimplifiedLayerNormalization
    assert normalized_layer(mlp_model()) is None and normalized_layer(conv_model()) is None
    without_norm = onnx.ModelProto()
    without_norm.CopyFrom(model)
    without_norm.graph.node[0].op_type = "Sigmoid"  # the same graph with an element-wise op for the norm
    del without_norm.graph.node[0].input[1:]
    del without_norm.graph.node[0].attribute[:]
    assert normalized_layer(without_norm) is None


@pytest.mark.parametrize("norm", ["layer", "rms", "rms-div"])
def test_a_decomposed_norm_marks_a_transformer_and_rotates_like_the_op(norm):
    """Older exports write LayerNorm (below opset 17) and RMSNorm as elementwise chains: the layer
    reading one is found as with the op, so the defaults below 4 bits rotate and refit it, and the
    rotated model computes the original's outputs at every level. A division by the root of
    something other than a mean is not a norm."""
    from onnx_qubo.api import quantize as run_quantize
    from onnx_qubo.config import QuantizeConfig

    model = layernorm_model(hidden=None, norm=norm)
    assert normalized_layer(model) == "up"
    x = np.random.default_rng(3).standard_normal((16, 6, 32)).astype(np.float32)
    if norm == "layer":  # the chain computes the op's norm
        np.testing.assert_allclose(run(model, x), run(layernorm_model(hidden=None), x), rtol=1e-4, atol=1e-4)
    result = run_quantize(model, QuantizeConfig.from_flat(bits=3, solver="rtn"), {"x": x})
    assert (str(result.config.rounding.rotate), str(result.config.rounding.scale)) == ("whole", "fit")
    turned = rotate(model, Rotation.WHOLE, 16, seed=0)
    for level in LEVELS:
        y_float = run(model, x, level)
        np.testing.assert_allclose(run(turned, x, level), y_float, atol=1e-4 * float(np.abs(y_float).max()))
    not_a_mean = onnx.ModelProto()
    not_a_mean.CopyFrom(model)
    next(n for n in not_a_mean.graph.node if n.name == "variance").op_type = "ReduceMax"
    assert normalized_layer(not_a_mean) is None


@pytest.mark.slow
def test_a_transformer_below_4_bits_is_rotated_and_refitted_by_default(tmp_path):
    """rotate and scale auto: whole and fit for a model whose layers read a LayerNorm, below 4 bits
    (measured on all-MiniLM-L6-v2: docs/results.md, "Transformer defaults"); none and mse at 4
    bits and for an MLP; each explicit option wins alone. The rotated model computes the original's
    outputs, and the rotated layer's reported cost is its output error, at every level."""
    from onnx_qubo.api import quantize as run_quantize
    from onnx_qubo.config import QuantizeConfig

    model = layernorm_model(hidden=None)
    x = np.random.default_rng(3).standard_normal((64, 6, 32)).astype(np.float32)
    cases = [({"bits": 3}, ("whole", "fit")), ({"bits": 2}, ("whole", "fit")), ({"bits": 4}, ("none", "mse")),
             ({"bits": 3, "rotate": "none"}, ("none", "fit")), ({"bits": 3, "scale": "mse"}, ("whole", "mse"))]
    for options, expected in cases:
        result = run_quantize(model, QuantizeConfig.from_flat({"solver": "rtn", **options}), {"x": x})
        assert (str(result.config.rounding.rotate), str(result.config.rounding.scale)) == expected, options
    mlp = run_quantize(mlp_model(widths=(8, 16)), QuantizeConfig.from_flat(bits=2, solver="rtn"),
                       {"x": x[:, 0, :8].copy()})
    assert (str(mlp.config.rounding.rotate), str(mlp.config.rounding.scale)) == ("none", "mse")
    turned = rotate(model, Rotation.WHOLE, 16, seed=0)
    out = tmp_path / "q.onnx"
    report = quantize(model, out, bits=3, granularity="block", block_size=16, rotate_block=16, calibration={"x": x},
                      speed=False)
    assert "inputs rotated" in report.scheme and [layer.name for layer in report.layers] == ["up"]
    written = onnx.load(out)
    for level in LEVELS:
        y_float = run(model, x, level)
        np.testing.assert_allclose(run(turned, x, level), y_float, atol=1e-4 * float(np.abs(y_float).max()))
        measured = float(((run(written, x, level) - y_float) ** 2).reshape(-1, y_float.shape[-1]).sum(axis=1).mean())
        assert report.layers[0].final_cost == pytest.approx(measured, rel=1e-3), level
