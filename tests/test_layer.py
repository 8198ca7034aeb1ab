"""One layer's work (layer.py) and its lowering to pass records (lowering.py), on statistics
computed here from known inputs: the QUBO's cost is the output error of the layer in numpy."""

import numpy as np
import pytest
from onnx import TensorProto

from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.grid import InputQuantizer
from onnx_qubo.core.progress import Progress
from onnx_qubo.core.types import InputStatistics
from onnx_qubo.layer import prepare_layer
from onnx_qubo.model.discovery import find_dense_layers
from onnx_qubo.model.lowering import quantized_weight
from onnx_qubo.plan import make_plan
from onnx_qubo.rounding.solvers import RoundToNearest

from graphs import gemm_model


def layer_and_inputs(samples=400, seed=0):
    layer = find_dense_layers(gemm_model(f=9, n=4, trans_b=1, alpha=0.5, beta=2.0, relu=False))[0][0]
    x = np.random.default_rng(seed).standard_normal((samples, 9)) + 0.2
    return layer, x


def statistics(x_seen, x=None):
    """E[z z^T] with z = [x_seen; 1], and the cross/drift terms when the float inputs differ."""
    z = np.hstack([x_seen, np.ones((len(x_seen), 1))])
    if x is None:
        return InputStatistics(z.T @ z / len(z), len(z))
    d = x - x_seen
    return InputStatistics(z.T @ z / len(z), len(z), z.T @ d / len(z), d.T @ d / len(z))


def numpy_error(layer, integers_dequantized, x, x_seen, bias):
    """Mean squared output error of the layer in numpy: float inputs/weights vs quantized."""
    y_float = layer.gain * x @ layer.weight.T + layer.bias
    y_quant = layer.gain * x_seen @ integers_dequantized.T + bias
    return float(((y_quant - y_float) ** 2).sum(axis=1).mean())


@pytest.mark.parametrize("arguments", [
    dict(bits=2), dict(bits=3, granularity="block", block_size=4, symmetric=False), dict(bits=4, scale="qubo"),
    dict(bits=2, bias="quantize"),
])
@pytest.mark.slow
def test_prepared_layer_cost_is_the_layer_error_in_numpy(arguments):
    layer, x = layer_and_inputs()
    plan = make_plan(QuantizeConfig.from_flat(solver="fast", **arguments), [layer]).layers[0]
    work = prepare_layer(plan, statistics(x), None)
    solved = work.finish(work.solve(Progress()), 0.0)
    q = solved.quantized()
    bias = layer.bias if q.bias is None else (q.bias.integers - q.bias.zero_point) * q.bias.scale
    shift = 0.0 if q.bias_shift is None else q.bias_shift  # the default bias correction
    error = numpy_error(layer, q.codes.dequantize(), x, x, bias + shift)
    assert solved.report.final_cost == pytest.approx(error, rel=1e-9)
    # below round to nearest on the same terms: its own correction where this layer has one
    nearest = work.finish(RoundToNearest().solve(work.problem), 0.0)
    assert solved.report.final_cost <= nearest.report.final_cost * (1 + 1e-12)
    assert solved.report.cost_rtn == nearest.report.cost_rtn


@pytest.mark.parametrize("arguments", [
    dict(bits=2), dict(bits=3, granularity="block", block_size=4, symmetric=False, scale="fit"),
    dict(bits=2, bias="quantize"),
])
def test_a_damped_layer_rounds_on_the_damped_gram_and_reports_its_output_error(arguments):
    """--damping adds a ridge to the objective's diagonal (the weights' part only): the rounding
    and scales change, the reported cost is still the layer's output error in numpy, below the
    damped objective's value for the same rounding."""
    layer, x = layer_and_inputs(samples=12)  # fewer samples than a noise-free Gram needs: damping matters
    solved = {}
    for damping in (0.0, 1.0):
        plan = make_plan(QuantizeConfig.from_flat(solver="fast", damping=damping, **arguments), [layer]).layers[0]
        work = prepare_layer(plan, statistics(x), None)
        solved[damping] = work.finish(work.solve(Progress()), 0.0)
        q = solved[damping].quantized()
        bias = layer.bias if q.bias is None else (q.bias.integers - q.bias.zero_point) * q.bias.scale
        shift = 0.0 if q.bias_shift is None else q.bias_shift
        error = numpy_error(layer, q.codes.dequantize(), x, x, bias + shift)
        assert solved[damping].report.final_cost == pytest.approx(error, rel=1e-9)
        objective = work.problem.energy(solved[damping].choice)
        assert (objective > solved[damping].report.cost_solved * (1 + 1e-9)) == (damping > 0)
    assert not np.array_equal(solved[0.0].quantized().codes.dequantize(), solved[1.0].quantized().codes.dequantize())


def test_int32_bias_and_quantized_inputs_fold_the_bias_correction():
    layer, x = layer_and_inputs()
    quantizer = InputQuantizer.for_range(float(x.min()), float(x.max()), signed=False)
    x_seen = quantizer.fake_quantize(x).astype(np.float64)
    options = QuantizeConfig.from_flat(bits=4, bias="int32", activations="uint8", bias_correction=True)
    work = prepare_layer(make_plan(options, [layer]).layers[0], statistics(x_seen, x), quantizer)
    solved = work.finish(work.solve(Progress()), 0.0)
    q = solved.quantized()
    assert q.bias is not None and q.bias.storage == TensorProto.INT32 and q.bias_shift is None
    dequantized = q.codes.dequantize()
    corrected = numpy_error(layer, dequantized, x, x_seen, q.bias.integers * q.bias.scale)
    uncorrected = numpy_error(layer, dequantized, x, x_seen, layer.bias)
    assert solved.report.cost_bias_corrected == pytest.approx(corrected, rel=1e-3)  # up to INT32 rounding
    assert corrected < uncorrected


@pytest.mark.parametrize("granularity, scale_shape, axis", [("tensor", (), {}), ("channel", (4,), {"axis": 0}),
                                                             ("block", (4, 3), {"axis": 1, "block_size": 4})])
def test_lowering_shapes_scales_as_dequantize_linear_reads_them(granularity, scale_shape, axis):
    layer, x = layer_and_inputs()
    options = QuantizeConfig.from_flat(bits=4, granularity=granularity, block_size=4 if granularity == "block" else 0,
                                    solver="rtn", symmetric=False)
    work = prepare_layer(make_plan(options, [layer]).layers[0], statistics(x), None)
    record, kernel = quantized_weight(work.finish(work.solve(Progress()), 0.0).quantized())
    assert record.weight.scale.shape == scale_shape and record.weight.attributes() == axis
    assert record.weight.zero_point is not None and record.weight.zero_point.shape == scale_shape
    assert record.weight.storage_type == TensorProto.UINT4 and record.form is layer.form
    assert record.weight.integers.min() >= 0 and record.weight.integers.max() <= 15
    assert kernel.kernel == "DequantizeLinear" and kernel.fallback is None and record.fast is None
