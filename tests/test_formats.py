"""Format ort: the same codes as the portable output, run by onnxruntime's fast kernels. Each
case must compute what the DequantizeLinear model of the same flags computes, at onnxruntime's
default and basic levels and with optimizations disabled; layers the kernels cannot run fall
back to the portable form with the reason in the report; impossible combinations are refused
before anything is written."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from runs import quantize

from onnx_qubo import OptionError

from graphs import gemm_model, matmul_model, mlp_model

LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          ort.GraphOptimizationLevel.ORT_DISABLE_ALL]
MODELS = {
    "gemm-transB1-alpha": lambda: gemm_model(f=40, n=12, trans_b=1, alpha=0.7, beta=0.5),
    "gemm-transB0": lambda: gemm_model(f=40, n=12, trans_b=0, relu=False),
    "matmul-add": lambda: matmul_model(f=40, n=12, bias=True),
    "matmul-3d": lambda: matmul_model(f=40, n=12, bias=True, leading=(3,)),
    "mlp": lambda: mlp_model(widths=(40, 24, 12)),
}
SCHEMES = {
    "int4-channel": dict(bits=4),
    "int2-channel-float-compute": dict(bits=2, ort_accuracy_level=0),  # 2-bit codes in the 4-bit kernel
    "uint4-block32": dict(bits=4, granularity="block", block_size=32, symmetric=False),
    "int3-tensor-bias-quantize": dict(bits=3, granularity="tensor", bias="quantize"),
    "int4-bias-correction": dict(bits=4, bias_correction=True),
    "w7a8-uint8": dict(bits=7, activations="uint8"),
    "w7a8-int8-int32-bias": dict(bits=7, activations="int8", bias="int32"),
    "w4a8-asymmetric-sequential": dict(bits=4, activations="uint8", symmetric=False, sequential=True),
}


def run(model, x, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.float64)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.slow
def test_ort_format_computes_what_the_portable_format_computes(model_name, scheme, tmp_path):
    model = MODELS[model_name]()
    shape = [d.dim_value or 64 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = (np.random.default_rng(1).standard_normal(shape) + 0.2).astype(np.float32)
    options = dict(SCHEMES[scheme])
    level = options.pop("ort_accuracy_level", None)
    common = dict(calibration={"x": x}, solver="fast", speed=False, **options)
    portable = quantize(model, tmp_path / "qdq.onnx", **common)
    fast = quantize(model, tmp_path / "ort.onnx", format="ort", ort_accuracy_level=level, **common)
    kernel = "MatMulIntegerToFloat" if "activations" in SCHEMES[scheme] else "MatMulNBits"
    assert [layer.kernel for layer in fast.layers] == [kernel] * len(fast.layers)
    assert [layer.cost_solved for layer in fast.layers] == [layer.cost_solved for layer in portable.layers]
    written = onnx.load(tmp_path / "ort.onnx")
    assert kernel in {n.op_type for n in written.graph.node}
    assert "DequantizeLinear" not in {n.op_type for n in written.graph.node}
    reference = run(onnx.load(tmp_path / "qdq.onnx"), x, LEVELS[-1])
    for level in LEVELS:
        y = run(written, x, level)
        assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 1e-3, level
    assert fast.evaluation.default_vs_unoptimized < 1e-3 and fast.evaluation.basic_vs_unoptimized < 1e-3


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.slow
def test_2_bit_codes_run_in_the_2_bit_kernel_by_default(model_name, tmp_path):
    """--format ort at 2 bits: accuracy level 4 (auto), where onnxruntime's 2-bit MatMulNBits is
    prepacked, so the weights take 2 bits in the file (tests/test_ort_forms.py checks the kernel
    against numpy); the output differs from the portable model's only by the int8 activations."""
    model = MODELS[model_name]()
    shape = [d.dim_value or 64 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = (np.random.default_rng(1).standard_normal(shape) + 0.2).astype(np.float32)
    common = dict(calibration={"x": x}, solver="fast", speed=False, bits=2, granularity="block", block_size=32,
                  head_bits=2)
    portable = quantize(model, tmp_path / "qdq.onnx", **common)
    fast = quantize(model, tmp_path / "ort.onnx", format="ort", **common)
    assert "format ort (accuracy level 4)" in fast.to_text()
    assert [(layer.kernel, layer.stored_bits) for layer in fast.layers] == [("MatMulNBits", 2)] * len(fast.layers)
    assert not [note for note in fast.notes if "codes stored in" in note]
    written = onnx.load(tmp_path / "ort.onnx")
    assert {a.i for n in written.graph.node for a in n.attribute if a.name == "bits"} == {2}
    reference = run(onnx.load(tmp_path / "qdq.onnx"), x, LEVELS[-1])
    outputs = [run(written, x, level) for level in LEVELS]
    for y in outputs:
        assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 0.02
        assert np.abs(y - outputs[-1]).max() <= 1e-5 * np.abs(outputs[-1]).max()
    assert 0 < fast.evaluation.default_vs_unoptimized < 0.02 and portable.evaluation.default_vs_unoptimized < 1e-3


@pytest.mark.parametrize("options, level, kernel_bits", [
    (dict(bits=2), 4, 2),  # per channel: one scale repeated over 2-bit kernel blocks of 32
    (dict(bits=2, granularity="block", block_size=64), 4, 2),
    (dict(bits=2, granularity="block", block_size=16), 0, 4),  # no prepacked 2-bit kernel for blocks of 16
    (dict(bits=2, ort_accuracy_level=0), 0, 4),
    (dict(bits=3), 0, 4),
    (dict(bits=8), 4, 8),
])
def test_the_auto_accuracy_level_follows_the_kernels_onnxruntime_runs_fast(options, level, kernel_bits):
    from onnx_qubo.api import quantize as quantize_model
    from onnx_qubo.config import QuantizeConfig

    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    config = QuantizeConfig.from_flat({"solver": "rtn", "format": "ort", "head_bits": options["bits"], **options})
    result = quantize_model(matmul_model(f=64, n=12), config, {"x": x})
    assert result.config.output.ort_accuracy_level == level
    nodes = [n for n in result.model.graph.node if n.op_type == "MatMulNBits"]
    assert [{a.name: a.i for a in n.attribute}["bits"] for n in nodes] == [kernel_bits]
    assert [{a.name: a.i for a in n.attribute}["accuracy_level"] for n in nodes] == [level]


@pytest.mark.slow
def test_a_layer_the_kernel_cannot_run_keeps_the_portable_form_and_says_why(tmp_path):
    model = gemm_model(f=40, n=12)
    model.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(np.ones((1, 12), np.float32), "C"))
    model.graph.input.append(onnx.helper.make_tensor_value_info("C", onnx.TensorProto.FLOAT, [1, 12]))
    x = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    report = quantize(model, tmp_path / "q.onnx", bits=4, calibration={"x": x}, format="ort", speed=False)
    assert report.layers[0].kernel == "DequantizeLinear"
    assert report.layers[0].kernel_fallback == "its bias is not one value per output"
    assert "layer 'dense' keeps DequantizeLinear: its bias is not one value per output" in report.to_text()


@pytest.mark.slow
def test_8_bit_codes_that_could_saturate_the_integer_kernel_keep_the_portable_form(tmp_path):
    """onnxruntime's u8s8 kernel saturates int16 pair sums on CPUs without VNNI: a range-filling
    8-bit layer keeps DequantizeLinear, so the written model computes its codes on every CPU."""
    x = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    report = quantize(gemm_model(f=40, n=12), tmp_path / "q.onnx", bits=8, activations="uint8",
                      calibration={"x": x}, format="ort", speed=False)
    assert report.layers[0].kernel == "DequantizeLinear"
    assert "saturate" in (report.layers[0].kernel_fallback or "")
    assert report.evaluation.default_vs_unoptimized < 1e-3


@pytest.mark.parametrize("arguments, message", [
    (dict(bits=8, ort_accuracy_level=0), "MatMulNBits has a fast float kernel for 1-4 bit weights only"),
    (dict(bits=4, granularity="block", block_size=24), "not block_size 24"),
    (dict(bits=8, activations="uint8", granularity="block", block_size=32), "not blocks"),
    (dict(bits=4, activations="uint8", ort_accuracy_level=4), "ort_accuracy_level applies to weight-only layers"),
])
def test_combinations_format_ort_cannot_serve_are_refused_before_writing(arguments, message, tmp_path):
    x = np.random.default_rng(0).standard_normal((16, 40)).astype(np.float32)
    with pytest.raises(OptionError, match=message):
        quantize(gemm_model(f=40, n=12), tmp_path / "q.onnx", calibration={"x": x}, format="ort", **arguments)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_accuracy_level_4_states_its_output_error(tmp_path):
    x = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    report = quantize(mlp_model(widths=(40, 24, 12)), tmp_path / "q.onnx", bits=4, calibration={"x": x},
                      format="ort", ort_accuracy_level=4, speed=False)
    assert all(layer.kernel == "MatMulNBits" for layer in report.layers)
    assert 0 < report.evaluation.default_vs_unoptimized < 0.05  # int8 activations inside the kernel
    assert "format ort (accuracy level 4)" in report.to_text()


@pytest.mark.parametrize("model_name", ["mnist_mlp", "mnist_cnn"])
def test_the_portable_file_folds_to_float_weights_with_disable_quant_qdq(model_name, tmp_path):
    """docs: with onnxruntime's session.disable_quant_qdq the weights' DequantizeLinear is folded
    once when the session is made (float speed); the outputs stay the portable model's, run with
    optimizations disabled."""
    models = Path(__file__).resolve().parents[1] / "models"
    x = dict(np.load(models / f"{model_name}.calib.npz"))
    out = tmp_path / "q.onnx"
    quantize(onnx.load(models / f"{model_name}.onnx"), out, bits=4, calibration={k: v[:64] for k, v in x.items()},
             speed=False)
    folded_options = ort.SessionOptions()
    folded_options.add_session_config_entry("session.disable_quant_qdq", "1")
    folded_options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    folded = ort.InferenceSession(str(out), folded_options, providers=["CPUExecutionProvider"])
    plain_options = ort.SessionOptions()
    plain_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(out), plain_options, providers=["CPUExecutionProvider"])
    feeds = {name: values[:32] for name, values in x.items()}
    got, want = folded.run(None, feeds)[0], plain.run(None, feeds)[0]
    assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)
    assert "DequantizeLinear" not in {node.op_type for node in onnx.load(tmp_path / "folded.onnx").graph.node}
    assert "DequantizeLinear" in {node.op_type for node in onnx.load(out).graph.node}
