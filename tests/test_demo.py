"""The shipped demo model, quantized as the README's first command does: real MNIST data."""

from pathlib import Path

import onnx
import pytest
import runs
from onnx import TensorProto

MODEL = Path(__file__).resolve().parent.parent / "models" / "mnist_mlp.onnx"


@pytest.fixture(scope="module")
def default_int2(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "int2.onnx"
    return runs.quantize(MODEL, out, bits=2), out


@pytest.mark.slow
def test_demo_2_bit_weights_feed_dequantize_linear(default_int2):
    _, out = default_int2
    model = onnx.load(out)
    types = {i.name: i.data_type for i in model.graph.initializer}
    dequantize = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert set(dequantize) == {f"fc{k}.weight_quantized" for k in (1, 2, 3)}
    unsigned = (TensorProto.UINT2, TensorProto.UINT4)
    for name, node in dequantize.items():  # each layer's grid: zero points only on the unsigned one
        # fc3 gives the logits: the output layer, at 4 bits below 4 (--head-bits' default)
        widths = (TensorProto.INT4, TensorProto.UINT4) if name.startswith("fc3") else (TensorProto.INT2,
                                                                                         TensorProto.UINT2)
        assert types[name] in widths
        assert (len(node.input) == 3) == (types[name] in unsigned)
    assert not [i for i in model.graph.initializer if i.name.endswith(".weight")]


def test_demo_int2_default_configuration_is_close_to_float(default_int2):
    report, _ = default_int2
    ev = report.evaluation
    assert ev.samples == 10000 and ev.default_matches_basic
    assert ev.float_accuracy - ev.quantized_accuracy <= 0.015
    assert all(layer.cost_solved < layer.cost_rtn for layer in report.layers)


@pytest.mark.slow
def test_demo_qubo_rounding_rescues_max_abs_scales(tmp_path):
    every_layer = dict(bits=2, head_bits=2, scale="minmax", symmetric=True)  # the paper's setting
    rtn = runs.quantize(MODEL, tmp_path / "rtn.onnx", solver="rtn", **every_layer)
    fast = runs.quantize(MODEL, tmp_path / "fast.onnx", solver="fast", **every_layer)
    assert fast.evaluation.quantized_accuracy - rtn.evaluation.quantized_accuracy >= 0.30


@pytest.mark.parametrize("model_name, arguments", [
    ("mnist_mlp", dict(bits=2)),
    ("mnist_mlp", dict(bits=4, granularity="block", block_size=32)),
    ("digits_mlp", dict(bits=4)),
    ("digits_mlp", dict(bits=7, activations="uint8")),
])
@pytest.mark.slow
def test_demo_accuracy_is_the_same_in_both_formats(model_name, arguments, default_int2, tmp_path):
    model = MODEL.with_name(f"{model_name}.onnx")
    qdq = default_int2[0] if (model_name, arguments) == ("mnist_mlp", {"bits": 2}) else \
        runs.quantize(model, tmp_path / "qdq.onnx", speed=False, **arguments)
    ort = runs.quantize(model, tmp_path / "ort.onnx", format="ort", speed=False, **arguments)
    assert {layer.kernel for layer in ort.layers} <= {"MatMulNBits", "MatMulIntegerToFloat"}
    assert abs(ort.evaluation.quantized_accuracy - qdq.evaluation.quantized_accuracy) <= 0.0005
