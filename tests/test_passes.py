"""The passes with the library's forms: each emitted form must match numpy with the dequantized
weights, under onnxruntime's default optimization level (what users run) as well as the basic
level; and the passes' errors in the library's terms. Each pass's own tests: tests/passes/."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.core.errors import DataError, ModelError, RuntimeFailure
from onnx_qubo.forms import FORMS as DENSE_FORMS
from onnx_qubo.model import lowering
from onnx_qubo.passes import (
    ActivationQuantization,
    CheckModel,
    InsertDequantize,
    QuantizedTensor,
    QuantizedWeight,
    RaiseOpset,
    run_passes,
)
from onnx_qubo.passes.opset import default_opset

from graphs import gemm_model, matmul_model, mlp_model
from helpers_passes import Broken, Refuses

LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC]
STORAGE = {2: (TensorProto.INT2, 25), 4: (TensorProto.INT4, 21), 8: (TensorProto.INT8, 13)}


def run(model, x, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def numpy_forward(model, weight_t, x):
    """The original graph's math with W^T replaced by ``weight_t`` ([f, n])."""
    node = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    y = x.astype(np.float64) @ weight_t * attrs.get("alpha", 1.0)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if node.op_type == "Gemm" and len(node.input) > 2:
        y = y + attrs.get("beta", 1.0) * inits["C"]
    if node.op_type == "MatMul" and "b" in inits:
        y = y + inits["b"]
    return np.maximum(y, 0) if model.graph.node[-1].op_type == "Relu" else y


def form_of(model):
    """The dense form that rewrites the model's first node."""
    return DENSE_FORMS[model.graph.node[0].op_type]


def quantize_w(model, bits, rank, rng):
    n, f = (5, 6)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    integers = rng.integers(qmin, qmax + 1, size=(n, f))
    scale = rng.random(n) * 0.5 + 0.1
    storage, opset = STORAGE[bits]
    weight = QuantizedTensor(integers, scale, None, storage)
    record = QuantizedWeight("W", weight, form_of(model), rank)
    out = run_passes(model, [RaiseOpset(opset), InsertDequantize([record]), CheckModel()]).model
    return out, (integers * scale.astype(np.float32)[:, None]).T.astype(np.float64)


FORMS = {
    "gemm_transB1": (lambda: gemm_model(trans_b=1, alpha=0.8, beta=0.5), 2, (4, 6)),
    "gemm_transB0": (lambda: gemm_model(trans_b=0, alpha=1.5), 2, (4, 6)),
    "gemm_no_bias": (lambda: gemm_model(bias=False), 2, (4, 6)),
    "matmul_add": (lambda: matmul_model(bias=True), 2, (4, 6)),
    "matmul": (lambda: matmul_model(bias=False), 2, (4, 6)),
    "matmul_3d": (lambda: matmul_model(bias=True, leading=(3,)), 3, (4, 3, 6)),
    "matmul_4d": (lambda: matmul_model(bias=False, leading=(2, 3)), 4, (4, 2, 3, 6)),
}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("form", FORMS)
def test_every_emitted_form_is_exact_at_default_and_basic_levels(form, bits):
    make, rank, x_shape = FORMS[form]
    model = make()
    rng = np.random.default_rng(bits)
    x = rng.standard_normal(x_shape).astype(np.float32)
    quantized, weight_t = quantize_w(model, bits, rank, rng)

    expected = numpy_forward(model, weight_t, x)
    for level in LEVELS:
        np.testing.assert_allclose(run(quantized, x, level), expected, rtol=1e-5, atol=1e-5)

    inits = {i.name: i for i in quantized.graph.initializer}
    assert "W" not in inits
    assert inits["W_quantized"].data_type == STORAGE[bits][0]
    assert len(inits["W_quantized"].raw_data) == -(-30 * bits // 8)  # packed: bits per weight
    assert default_opset(quantized) == max(17, STORAGE[bits][1])  # raised, never lowered
    dq = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and helper.get_attribute_value(dq[0].attribute[0]) == 0  # axis=0
    consumer = next(n for n in quantized.graph.node if dq[0].output[0] in n.input)
    assert consumer.op_type == "Gemm"
    assert {a.name: helper.get_attribute_value(a) for a in consumer.attribute}["transB"] == 1


def _tensor(rng, storage, shape, scale_shape, block_size=0, zero_point=True):
    lo, hi = {TensorProto.INT2: (-2, 1), TensorProto.UINT2: (0, 3), TensorProto.INT4: (-8, 7),
              TensorProto.UINT4: (0, 15), TensorProto.INT8: (-128, 127), TensorProto.INT32: (-5000, 5000)}[storage]
    integers = rng.integers(lo, hi + 1, size=shape)
    scale = rng.random(scale_shape) * 0.2 + 0.05
    zp = rng.integers(lo, hi + 1, size=scale_shape) if zero_point else None
    return QuantizedTensor(integers, scale, zp, storage, block_size)


def _dequantized(t: QuantizedTensor, f: int) -> np.ndarray:
    scale, zp = t.scale.astype(np.float32).astype(np.float64), 0 if t.zero_point is None else t.zero_point
    if t.scale.ndim == 2:  # blocks along the inputs
        scale, zp = (np.repeat(np.broadcast_to(a, t.scale.shape), t.block_size, axis=1)[:, :f] for a in (scale, zp))
    elif t.scale.ndim == 1:
        scale, zp = scale[:, None], np.asarray(zp)[..., None] if t.zero_point is not None else 0
    return (t.integers - zp) * scale


VARIANTS = {  # weight storage, scale shape, block size, zero point; bias storage; activation type
    "tensor-int4": (TensorProto.INT4, (), 0, False, None, None),
    "channel-uint2-zero-point": (TensorProto.UINT2, (5,), 0, True, None, None),
    "block-uint4-uneven": (TensorProto.UINT4, (5, 2), 4, True, None, None),
    "block-int2": (TensorProto.INT2, (5, 3), 2, False, None, None),
    "bias-int2": (TensorProto.INT2, (5,), 0, False, TensorProto.INT2, None),
    "inputs-uint8": (TensorProto.INT4, (5,), 0, False, None, TensorProto.UINT8),
    "inputs-int8-block": (TensorProto.INT4, (5, 2), 4, True, None, TensorProto.INT8),
    "inputs-int8-int32-bias-int8": (TensorProto.INT8, (5,), 0, False, TensorProto.INT32, TensorProto.INT8),
    "inputs-uint8-int32-bias-int2": (TensorProto.INT2, (5,), 0, False, TensorProto.INT32, TensorProto.UINT8),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", ["gemm_transB0", "matmul_add", "matmul_3d"])
def test_scales_zero_points_biases_and_quantized_inputs_are_exact(form, variant):
    """Every scheme the pipeline emits, against numpy with the dequantized tensors (and the
    QuantizeLinear -> DequantizeLinear of the input computed by hand)."""
    storage, scale_shape, block, zero_point, bias_storage, input_type = VARIANTS[variant]
    make, rank, x_shape = FORMS[form]
    model = make()
    rng = np.random.default_rng(len(variant))
    weight = _tensor(rng, storage, (5, 6), scale_shape, block, zero_point)
    bias_name = "C" if form.startswith("gemm") else "b"
    bias = None
    if bias_storage is not None:
        bias = _tensor(rng, bias_storage, (5,), () if bias_storage != TensorProto.INT32 else (5,),
                       zero_point=bias_storage != TensorProto.INT32)
    activation = None
    if input_type is not None:
        activation = ActivationQuantization(0.03, 10 if input_type == TensorProto.UINT8 else -3, input_type)
    spec = QuantizedWeight("W", weight, form_of(model), rank, bias_name=bias_name if bias else None, bias=bias,
                           activation=activation)
    opset = 25 if storage in (TensorProto.INT2, TensorProto.UINT2) else 21
    quantized = run_passes(model, [RaiseOpset(opset), InsertDequantize([spec]), CheckModel()]).model

    x = rng.standard_normal(x_shape).astype(np.float32)
    seen = x
    if activation is not None:
        lo, hi = (-128, 127) if input_type == TensorProto.INT8 else (0, 255)
        q = np.clip(np.rint(x / np.float32(0.03)) + activation.zero_point, lo, hi)
        seen = ((q - activation.zero_point) * np.float32(0.03)).astype(np.float32)
    w = _dequantized(weight, 6)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    y = seen.astype(np.float64) @ w.T * attrs.get("alpha", 1.0)
    if bias is not None:  # holds the effective bias: Gemm's beta is dropped
        y = y + (bias.integers - (0 if bias.zero_point is None else bias.zero_point)) * bias.scale.astype(np.float32)
    else:
        y = y + attrs.get("beta", 1.0) * inits[bias_name]
    if model.graph.node[-1].op_type == "Relu":
        y = np.maximum(y, 0)
    for level in LEVELS:
        np.testing.assert_allclose(run(quantized, x, level), y, rtol=1e-5, atol=1e-4)
    assert bias_name not in {i.name for i in quantized.graph.initializer} or bias is None


def test_a_float_gemm_bias_stays_float_with_quantized_inputs():
    """backends/portable.py rule 4: onnxruntime re-quantizes the float C of a Gemm whose inputs are
    quantized and whose output (through a Relu) is quantized again to INT32 at the basic level
    and above; the bias is added after the Gemm instead."""
    model = mlp_model(widths=(12, 9, 7), seed=3)
    rng = np.random.default_rng(3)
    records = []
    for name, (n, f) in (("W0", (9, 12)), ("W1", (7, 9))):
        weight = QuantizedTensor(rng.integers(-128, 128, size=(n, f)), rng.random(n) * 0.01 + 0.01, None,
                                 TensorProto.INT8)
        records.append(QuantizedWeight(name, weight, DENSE_FORMS["Gemm"], 2,
                                       activation=ActivationQuantization(0.03, 3, TensorProto.UINT8)))
    quantized = run_passes(model, [RaiseOpset(13), InsertDequantize(records), CheckModel()]).model
    x = (rng.standard_normal((64, 12)) * 2).astype(np.float32)
    reference = run(quantized, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for level in LEVELS:
        np.testing.assert_allclose(run(quantized, x, level), reference, rtol=1e-6, atol=1e-6)


class _LibraryRefusal:
    def call(self, model):
        raise DataError("the library's own refusal")


def test_the_library_runs_passes_with_their_errors_in_its_own_terms():
    """A pass's UnsupportedModel is a ModelError (exit 1), a foreign failure a RuntimeFailure
    (exit 4) naming the pass with the original cause, and the library's own error raised inside
    a pass (a form's, external.read_array's) itself; the messages are the passes'."""
    model = gemm_model()
    assert lowering.run_passes(model, [RaiseOpset(21), CheckModel()]).modified is True
    with pytest.raises(RuntimeFailure, match="^graph pass Broken failed: 'boom'$") as caught:
        lowering.run_passes(model, [RaiseOpset(21), Broken()])
    assert isinstance(caught.value.__cause__, KeyError)
    with pytest.raises(ModelError, match="^node 'x' cannot be handled$"):
        lowering.run_passes(model, [Refuses()])
    with pytest.raises(DataError, match="^the library's own refusal$"):
        lowering.run_passes(model, [_LibraryRefusal()])
