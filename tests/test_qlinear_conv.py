"""Format ort with quantized activations: a Conv runs as QuantizeLinear -> QLinearConv ->
DequantizeLinear. The written model, at onnxruntime's default, basic and disabled levels, equals
the numpy reference (backends/ort_conv.qlinear_conv_reference) on the integers read back from the written
file, to within one output code where the float requantization ties; the QUBO energy is still the
portable model's error, and the fast model differs from it by the output rounding only."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from runs import quantize
from test_conv import conv_model, measured_error
from test_ort_forms import codes_of

from onnx_qubo.backends.kernels import Format
from onnx_qubo.backends.ort_conv import qlinear_conv, qlinear_conv_reference
from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.core.grid import InputQuantizer
from onnx_qubo.core.options import Activations, RangeMethod
from onnx_qubo.core.progress import Progress
from onnx_qubo.core.views import ConvGeometry
from onnx_qubo.pipeline import calibrate

LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          ort.GraphOptimizationLevel.ORT_DISABLE_ALL]
MODELS = {  # shapes QLinearConv runs faster than float: >= 8 input channels, >= 32 per group when grouped
    "2d-stride-pad": lambda: conv_model(channels=(8, 5), strides=[2, 1], pads=[1, 0, 1, 2]),
    "2d-dilation-no-bias": lambda: conv_model(channels=(8, 6), dilations=[2, 1], pads=[2, 1, 2, 1], bias=False),
    "2d-auto-pad": lambda: conv_model(channels=(9, 5), auto_pad="SAME_UPPER", strides=[2, 2]),
    "1d": lambda: conv_model(spatial=(20,), kernel=(5,), channels=(8, 5), strides=[3], pads=[2, 2]),
    "3d": lambda: conv_model(spatial=(5, 6, 4), kernel=(3, 2, 2), channels=(8, 4), pads=[1, 0, 1, 1, 1, 0]),
    "2d-groups": lambda: conv_model(channels=(64, 6), group=2, kernel=(1, 1), spatial=(5, 4)),
}
SCHEMES = {
    "w7-int8": dict(bits=7, activations="int8"),
    "w4-uint8-bias-correction": dict(bits=4, activations="uint8", bias_correction=True),
    "w7-uint8-asymmetric-tensor-int32-bias": dict(bits=7, activations="uint8", symmetric=False, granularity="tensor",
                                                  bias="int32"),
    "w6-int8-percentile-bias-quantize": dict(bits=6, activations="int8", activation_range="percentile",
                                             bias="quantize"),
}


def run(model, x, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def kernel_inputs(model: onnx.ModelProto) -> tuple[onnx.NodeProto, list[np.ndarray]]:
    """The QLinearConv node and its inputs 1-8 as arrays, read from the model's initializers."""
    node = next(n for n in model.graph.node if n.op_type == "QLinearConv")
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return node, [values[name] for name in node.input[1:]]


def on_the_grid(x: np.ndarray, scale: np.float32, zero: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Input codes of ``x`` and floats that QuantizeLinear maps to them without doubt (0.3 step
    from the code, far from a tie)."""
    info = np.iinfo(zero.dtype)
    codes = np.clip(np.rint(x / scale) + int(zero), info.min, info.max).astype(np.int64)
    near = (codes - int(zero)) * np.float64(scale) + rng.uniform(-0.3, 0.3, x.shape) * np.float64(scale)
    return codes, near.astype(np.float32)


def assert_equals_reference(model: onnx.ModelProto, xq: np.ndarray, x: np.ndarray, geometry: ConvGeometry) -> None:
    node, inputs = kernel_inputs(model)
    expected = qlinear_conv_reference(xq, inputs, geometry)
    y_scale, y_zero = inputs[5], int(inputs[6])
    for level in LEVELS:
        y = run(model, x, level).astype(np.float64)
        codes = np.rint(y / np.float64(y_scale)).astype(np.int64) + y_zero
        np.testing.assert_allclose(y, (codes - y_zero) * np.float64(y_scale), rtol=1e-6, atol=1e-12)
        differ = np.abs(codes - expected)
        assert differ.max() <= 1, (level, differ.max())  # one code at most, where requantization ties
        assert differ.mean() <= 0.01, (level, differ.mean())


def geometry_of(model: onnx.ModelProto, node: onnx.NodeProto) -> ConvGeometry:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    weight = next(i for i in model.graph.initializer if i.name == node.input[3])
    return ConvGeometry.from_attributes(attributes, tuple(weight.dims))


@pytest.mark.parametrize("model_name, scheme", [
    (model, scheme) for model in MODELS for scheme in SCHEMES
    if not (model == "2d-groups" and "asymmetric" in scheme)])  # a zero point per group: refused below
@pytest.mark.slow
def test_qlinear_conv_computes_the_reference_on_the_written_integers(model_name, scheme, tmp_path):
    model = MODELS[model_name]()
    shape = [d.dim_value or 24 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) + 0.3).astype(np.float32)
    common = dict(calibration={"x": x}, batch_size=7, speed=False, **{"symmetric": True, **SCHEMES[scheme]})
    portable = quantize(model, tmp_path / "qdq.onnx", **common)
    fast = quantize(model, tmp_path / "ort.onnx", format="ort", **common)
    assert [(layer.kernel, layer.kernel_fallback) for layer in fast.layers] == [("QLinearConv", None)]
    written = onnx.load(tmp_path / "ort.onnx")
    assert [n.op_type for n in written.graph.node] == ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]
    # the QUBO energy is the portable model's error; the fast model adds the output rounding only
    assert fast.layers[0].cost_solved == portable.layers[0].cost_solved
    qdq = onnx.load(tmp_path / "qdq.onnx")
    cost = fast.layers[0].cost_bias_corrected or fast.layers[0].cost_solved
    assert cost == pytest.approx(measured_error(model, qdq, x), rel=1e-3)
    node, inputs = kernel_inputs(written)
    y_scale, y_zero = float(inputs[5]), int(inputs[6])
    representable = run(qdq, x, LEVELS[-1]).astype(np.float64).clip(-y_zero * y_scale, (255 - y_zero) * y_scale)
    gap = np.abs(run(written, x, LEVELS[0]).astype(np.float64) - representable)
    assert 0 < gap.max() <= 0.55 * y_scale  # the output rounding: half a step (the bias's INT32 rounding is far less)
    assert 0 < fast.evaluation.default_vs_unoptimized < 0.05
    assert "QLinearConv also rounds each such Conv's output to 8 bits" in fast.to_text()
    xq, near = on_the_grid(x, inputs[0], inputs[1], rng)
    assert_equals_reference(written, xq, near, geometry_of(written, node))


@pytest.mark.slow
def test_the_automatic_choice_runs_qlinear_conv_like_the_plain_path(tmp_path):
    """Both paths end in pipeline.finish: a Conv the automatic choice quantizes gets its calibrated
    output range and runs as QLinearConv, as with fixed bits (it kept the portable form before)."""
    model = MODELS["2d-stride-pad"]()
    shape = [d.dim_value or 24 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = (np.random.default_rng(1).standard_normal(shape) + 0.3).astype(np.float32)
    common = dict(calibration={"x": x}, bits=4, activations="uint8", format="ort", speed=False)
    plain = quantize(model, tmp_path / "plain.onnx", **common)
    auto = quantize(model, tmp_path / "auto.onnx", max_error=1.0, **common)
    assert [(layer.kernel, layer.kernel_fallback) for layer in auto.layers] == [("QLinearConv", None)]
    assert auto.layers[0].kernel == plain.layers[0].kernel
    assert "QLinearConv also rounds each such Conv's output to 8 bits" in auto.to_text()
    assert [n.op_type for n in onnx.load(tmp_path / "auto.onnx").graph.node] == [
        "QuantizeLinear", "QLinearConv", "DequantizeLinear"]


@pytest.mark.parametrize("method", [RangeMethod.MINMAX, RangeMethod.PERCENTILE])
def test_output_ranges_are_calibrated_in_the_input_passes_only_for_convs_the_kernel_may_run(method):
    model = conv_model(spatial=(32, 32), channels=(8, 5), pads=[1, 1, 1, 1], second=True)  # conv2: 5 channels, too few
    x = np.random.default_rng(2).standard_cauchy((128, 8, 32, 32)).astype(np.float32)  # percentile clips 6 outputs
    data = load_dataset({"x": x}, model, batch_size=64)
    fast = calibrate(model, data, Progress(), activations=Activations.UINT8, activation_range=method,
                     format=Format.ORT)
    assert list(fast.output_quantizers) == ["h"]  # conv's output; conv2 (5 channels) is not asked for
    assert calibrate(model, data, Progress(), activations=Activations.UINT8,
                     activation_range=method).output_quantizers == {}
    h = run(onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(["x"], ["h"]), x, LEVELS[-1])
    if method == RangeMethod.MINMAX:
        assert fast.output_quantizers["h"] == InputQuantizer.for_range(float(h.min()), float(h.max()), False)
    else:
        quantizer = fast.output_quantizers["h"]
        assert quantizer.scale < InputQuantizer.for_range(float(h.min()), float(h.max()), False).scale


@pytest.mark.parametrize("arguments, reason", [
    (dict(model=lambda: conv_model(channels=(8, 8), group=8, pads=[1, 1, 1, 1]), activations="uint8"),
     "QLinearConv runs slower than float Conv on a depthwise Conv"),
    (dict(model=lambda: conv_model(channels=(3, 8), pads=[1, 1, 1, 1]), activations="int8"),
     "slower than float Conv on 3 input channels per group"),
    (dict(model=lambda: conv_model(channels=(32, 4), group=2, kernel=(1, 1)), activations="uint8"),
     "slower than float Conv on 16 input channels per group in 2 groups"),
    (dict(model=MODELS["2d-groups"], activations="uint8", symmetric=False, granularity="tensor"),
     "one weight zero point for all channels"),  # a scale and zero point per group
    (dict(model=lambda: conv_model(channels=(8, 5)), activations="uint8", symmetric=False),
     "one weight zero point for all channels"),
    (dict(model=lambda: conv_model(channels=(8, 5))), "onnxruntime has no weight-only integer Conv kernel"),
])
@pytest.mark.slow
def test_a_conv_the_kernel_refuses_keeps_the_portable_form_and_says_why(arguments, reason, tmp_path):
    arguments = dict(arguments)
    model = arguments.pop("model")()
    shape = [d.dim_value or 16 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    bits = 8 if "activations" in arguments else 4
    report = quantize(model, tmp_path / "q.onnx", bits=bits, calibration={"x": x}, format="ort", speed=False,
                      **arguments)
    assert report.layers[0].kernel == "DequantizeLinear"
    assert reason in report.layers[0].kernel_fallback
    assert f"layer 'conv' keeps DequantizeLinear: {report.layers[0].kernel_fallback}" in report.to_text()
    assert "QLinearConv" not in {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}


def fresh(base: str) -> str:
    return base


def test_the_builder_refuses_what_the_kernel_cannot_compute():
    geometry = ConvGeometry.from_attributes({}, (4, 8, 3, 3))
    rng = np.random.default_rng(4)
    quant = InputQuantizer(0.1, 3, False)
    codes = codes_of(rng.integers(-8, 8, (4, 72)), np.full(4, 0.1, np.float32), None, 4)
    assert not isinstance(qlinear_conv(codes, None, geometry, quant, quant, "x", "y", fresh), str)
    blocks = codes_of(codes.integers, np.full((4, 3), 0.1, np.float32), None, 4, block=32)
    assert "not per block" in qlinear_conv(blocks, None, geometry, quant, quant, "x", "y", fresh)
    tiny = codes_of(codes.integers, np.full(4, 1e-6, np.float32), None, 4)
    assert "does not fit INT32" in qlinear_conv(tiny, np.full(4, 1e6), geometry, quant, InputQuantizer(1e-7, 0, False),
                                                "x", "y", fresh)
