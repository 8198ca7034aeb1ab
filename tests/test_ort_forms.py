"""The onnxruntime-specific forms compute what the integer codes say, at every optimization level.

Each case builds a one-layer model from codes drawn here and compares its output with numpy
(dequantize in float64, matmul) and across onnxruntime's disabled, basic and default levels.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.backends.ort import OrtForm, matmul_integer_to_float, matmul_nbits, pack_bits, reference
from onnx_qubo.core.grid import Granularity, GroupScales, InputQuantizer, Scheme, WeightCodes

LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
# Relative to max |y|: float32 accumulation error is ~1e-7; an int8 activation code rounded the
# other way at a tie moves one product by one step, far below this.
TOLERANCE = 1e-3


class Fresh:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"


def codes_of(integers: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, bits: int,
             block: int = 0) -> WeightCodes:
    """Codes from a scale per tensor (``()``), per row (``[n]``) or per block of ``block`` inputs
    (``[n, g]``), and a zero point of the same shape (None: the signed grid)."""
    n, f = integers.shape
    scale = np.asarray(scale, np.float64)
    granularity = Granularity.BLOCK if block else Granularity.CHANNEL if scale.ndim else Granularity.TENSOR
    groups = np.broadcast_to(scale.reshape(n, -1) if scale.ndim else scale, (n, scale.shape[1] if block else 1))
    zero = np.zeros(groups.shape, np.int64) if zero_point is None else np.broadcast_to(
        np.asarray(zero_point).reshape(n, -1) if np.ndim(zero_point) else zero_point, groups.shape)
    scheme = Scheme(bits, granularity, block, symmetric=zero_point is None)
    return WeightCodes(np.asarray(integers), GroupScales(groups, zero, block or f), scheme)


def make_codes(rng: np.random.Generator, n: int, f: int, bits: int, granularity: str, symmetric: bool,
               bias: bool, block: int = 0) -> tuple[WeightCodes, np.ndarray | None]:
    """Random codes on the grid, and a bias (or None)."""
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    shape = {"tensor": (), "channel": (n,), "block": (n, -(-f // block) if block else 0)}[granularity]
    codes = codes_of(rng.integers(low, high + 1, size=(n, f)),
                     np.asarray(rng.uniform(0.01, 0.1, size=shape), np.float32),
                     None if symmetric else np.asarray(rng.integers(low, high + 1, size=shape)),
                     bits, block if granularity == "block" else 0)
    return codes, rng.normal(size=n).astype(np.float32) if bias else None


def model_of(form: OrtForm, rank: int) -> onnx.ModelProto:
    batch = [f"batch_{i}" for i in range(rank - 1)]
    graph = helper.make_graph(form.nodes, "layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, batch + ["f"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, batch + ["n"])],
                              form.initializers)
    opsets = {"": 21, **form.opsets}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def relative_errors(form: OrtForm, expected: np.ndarray, x: np.ndarray) -> list[float]:
    model = model_of(form, x.ndim)
    outputs = [run(model, x, level) for level in LEVELS]
    assert all(out.shape == expected.shape for out in outputs)
    return [float(np.abs(out - expected).max() / np.abs(expected).max()) for out in outputs]


def kernel_block(form: OrtForm) -> int:
    return next(a.i for a in form.nodes[-1].attribute if a.name == "block_size")


def activations(rng: np.random.Generator, rank: int, f: int) -> np.ndarray:
    return rng.normal(size=(3, f) if rank == 2 else (2, 3, f)).astype(np.float32)


GRANULARITIES = [("tensor", 0), ("channel", 0), ("block", 16), ("block", 32), ("block", 48)]


@pytest.mark.parametrize("n,f,bits,granularity,symmetric,bias,rank", [
    (n, f, bits, granularity, symmetric, bias, rank)
    for n, f, bits, granularity, symmetric, bias, rank in itertools.product(
        (8, 37), (64, 70), (2, 3, 4, 8), GRANULARITIES, (True, False), (True, False), (2, 3))
    if bias == (rank == 3) or n == 37  # every axis varies; all combinations at the odd width
])
def test_matmul_nbits_computes_the_codes(n: int, f: int, bits: int, granularity: tuple[str, int],
                                         symmetric: bool, bias: bool, rank: int) -> None:
    rng = np.random.default_rng([n, f, bits, symmetric, bias, rank, granularity[1]])
    codes, b = make_codes(rng, n, f, bits, granularity[0], symmetric, bias, granularity[1])
    x = activations(rng, rank, f)
    accuracy = 4 if bits == 8 else 0  # 8-bit weights are only fast with int8 compute
    form = matmul_nbits(codes, b, "x", "y", Fresh(), accuracy_level=accuracy)
    assert isinstance(form, OrtForm), form
    if accuracy == 0:
        assert max(relative_errors(form, reference(codes, x, bias=b), x)) < TOLERANCE
    else:
        expected = reference(codes, x, int8_blocks=kernel_block(form), bias=b)
        # At int8 compute one activation code may round the other way (seen once in this grid):
        # that moves an output by up to one activation step times the largest weight.
        slack = np.abs(x).max() / 127 * np.abs(codes.dequantize()).max() / np.abs(expected).max()
        assert max(relative_errors(form, expected, x)) < TOLERANCE + slack


@pytest.mark.parametrize("n,f,bits,granularity,symmetric,rank", [
    (n, f, bits, granularity, symmetric, rank) for n, f, bits, granularity, symmetric, rank in itertools.product(
        (5, 37), (70, 300), (1, 2), [("channel", 0), ("block", 32), ("block", 64), ("block", 128), ("block", 96),
                                  ("block", 256)],
        (True, False), (2, 3))
    if granularity[1] <= f and (rank == 3) == (n == 37)
])
def test_matmul_nbits_writes_2_bit_codes_into_the_2_bit_kernel_at_int8_compute(
        n: int, f: int, bits: int, granularity: tuple[str, int], symmetric: bool, rank: int) -> None:
    """At accuracy_level 4 the 2-bit kernel is prepacked for blocks of 32-128 (a layer's blocks
    of 96 split into 32, of 256 into 128): codes of 1-2 bits go there, packed four to a byte, and compute the
    codes with int8 activations per kernel block, N not a multiple of 4 and padded K included."""
    rng = np.random.default_rng([n, f, bits, symmetric, rank, granularity[1]])
    codes, b = make_codes(rng, n, f, bits, granularity[0], symmetric, True, granularity[1])
    form = matmul_nbits(codes, b, "x", "y", Fresh(), accuracy_level=4)
    assert isinstance(form, OrtForm), form
    block = kernel_block(form)
    assert form.weight_bits == 2 and block == {0: 32, 96: 32, 256: 128}.get(granularity[1], granularity[1])
    assert next(a.i for a in form.nodes[-1].attribute if a.name == "bits") == 2
    assert numpy_helper.to_array(form.initializers[0]).shape == (n, -(-f // block), block // 4)
    x = activations(rng, rank, f)
    expected = reference(codes, x, int8_blocks=block, bias=b)
    slack = np.abs(x).max() / 127 * np.abs(codes.dequantize()).max() / np.abs(expected).max()
    assert max(relative_errors(form, expected, x)) < TOLERANCE + slack


@pytest.mark.parametrize("accuracy_level,block,kernel", [(0, 32, 32), (4, 16, 16), (4, 48, 16)])
def test_2_bit_codes_go_to_the_4_bit_kernel_where_the_2_bit_one_is_not_prepacked(accuracy_level: int, block: int,
                                                                                 kernel: int) -> None:
    rng = np.random.default_rng(block)
    codes, bias = make_codes(rng, 8, 480, 2, "block", True, True, block)
    form = matmul_nbits(codes, bias, "x", "y", Fresh(), accuracy_level=accuracy_level)
    assert isinstance(form, OrtForm) and form.weight_bits == 4 and kernel_block(form) == kernel
    refusal = matmul_nbits(codes, bias, "x", "y", Fresh(), accuracy_level=accuracy_level, kernel_bits=2,
                           block_size=kernel)
    assert isinstance(refusal, str) and "no prepacked CPU kernel for 2-bit" in refusal


@pytest.mark.parametrize("n,kernel_bits,block,accuracy_level", [
    (5, 2, 16, 0), (37, 2, 32, 0), (37, 2, 16, 4), (37, 2, 256, 4), (6, 8, 16, 0), (37, 4, 512, 0)])
def test_matmul_nbits_slow_kernels_are_correct_but_refused(n: int, kernel_bits: int, block: int,
                                                          accuracy_level: int) -> None:
    """2-bit weights at fp32 compute or in blocks of 16 or 256 (N not a multiple of 4 included),
    8-bit at fp32 compute and blocks above 256 have no prepacked kernel: refused by default,
    correct when allowed (the slow 2-bit kernel computes in float whatever the level)."""
    rng = np.random.default_rng(n)
    codes, bias = make_codes(rng, n, 512, 2, "channel", False, True)
    refusal = matmul_nbits(codes, bias, "x", "y", Fresh(), kernel_bits=kernel_bits, block_size=block,
                           accuracy_level=accuracy_level)
    assert isinstance(refusal, str) and "prepacked" in refusal
    form = matmul_nbits(codes, bias, "x", "y", Fresh(), kernel_bits=kernel_bits, block_size=block,
                        accuracy_level=accuracy_level, allow_slow=True)
    assert isinstance(form, OrtForm)
    x = activations(rng, 3, 512)
    assert max(relative_errors(form, reference(codes, x, bias=bias), x)) < TOLERANCE


def test_onnxruntime_fuses_int2_dequantize_matmul_wrongly_for_odd_widths() -> None:
    """Why no form goes through onnxruntime's own DequantizeLinear -> MatMulNBits rewrite: for
    INT2 weights [K, N] with N not a multiple of 4 it computes something else (the 2-bit
    kernel itself, fed directly, is right: test above)."""
    rng = np.random.default_rng(0)
    k, n = 64, 6
    q = rng.integers(-2, 2, size=(k, n))
    s = rng.uniform(0.01, 0.1, size=(k // 32, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=32),
         helper.make_node("MatMul", ["x", "wd"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(q.astype(ml_dtypes.int2), "w"), numpy_helper.from_array(s, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    x = rng.normal(size=(3, k)).astype(np.float32)
    expected = x @ (q * np.repeat(s, 32, axis=0))
    error = [np.abs(run(model, x, level) - expected).max() / np.abs(expected).max() for level in LEVELS]
    assert error[0] < TOLERANCE and error[2] > 0.1


@pytest.mark.parametrize("block", [16, 64, 256])
def test_matmul_nbits_int8_compute_quantizes_activation_blocks(block: int) -> None:
    """accuracy_level 4 is exactly "round each block of a row's inputs to int8, max-abs scale":
    far from the float result, equal to that model of it."""
    rng = np.random.default_rng(block)
    codes, bias = make_codes(rng, 37, 300, 4, "channel", True, True)
    form = matmul_nbits(codes, bias, "x", "y", Fresh(), accuracy_level=4, block_size=block)
    assert isinstance(form, OrtForm)
    x = activations(rng, 3, 300)
    assert min(relative_errors(form, reference(codes, x, bias=bias), x)) > 1e-4
    assert max(relative_errors(form, reference(codes, x, int8_blocks=block, bias=bias), x)) < TOLERANCE


@pytest.mark.parametrize("n,f,bits,granularity,symmetric,signed_input,bias,rank", [
    case for case in itertools.product((8, 37), (64, 70), (4, 7), ("tensor", "channel"), (True, False),
                                       (True, False), (True, False), (2, 3))
    if case[6] == (case[7] == 3) or case[0] == 37
])
def test_matmul_integer_to_float_computes_the_codes(n: int, f: int, bits: int, granularity: str, symmetric: bool,
                                                    signed_input: bool, bias: bool, rank: int) -> None:
    """Exact int32 accumulation; the tolerance covers float32 scaling and an activation landing
    one step away from numpy's rounding (one code of ``x/scale`` off by one moves y by
    ``scale * |w|``, under 1e-3 of max |y| here)."""
    rng = np.random.default_rng([n, f, bits, symmetric, signed_input, bias, rank])
    codes, b = make_codes(rng, n, f, bits, granularity, symmetric, bias)
    quant = InputQuantizer(scale=float(rng.uniform(0.01, 0.03)), zero_point=int(rng.integers(-20, 20)) +
                           (0 if signed_input else 128), signed=signed_input)
    x = activations(rng, rank, f)
    form = matmul_integer_to_float(codes, b, quant, "x", "y", Fresh())
    assert isinstance(form, OrtForm), form
    assert max(relative_errors(form, reference(codes, x, quant, bias=b), x)) < TOLERANCE


def test_matmul_integer_to_float_keeps_the_bias_float() -> None:
    """Zero weights: the output is the float bias itself, bit for bit, at every level (an INT32
    re-quantization at scale a_scale * w_scale would round it)."""
    rng = np.random.default_rng(3)
    bias = rng.normal(size=8).astype(np.float32)
    codes = codes_of(np.zeros((8, 32), np.int64), np.full(8, 0.01, np.float32), None, 8)
    form = matmul_integer_to_float(codes, bias, InputQuantizer(0.02, 0, True), "x", "y", Fresh())
    assert isinstance(form, OrtForm)
    model = model_of(form, 2)
    x = rng.normal(size=(4, 32)).astype(np.float32)
    for level in LEVELS:
        np.testing.assert_array_equal(run(model, x, level), np.broadcast_to(bias, (4, 8)))


@pytest.mark.parametrize("bits, symmetric", [(7, True), (4, False), (8, False)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_matmul_integer_to_float_is_exact_where_int16_pair_sums_would_saturate(bits: int, symmetric: bool,
                                                                              granularity: str) -> None:
    """The worst case for the u8s8 kernel of CPUs without VNNI (VPMADDUBSW adds two products in
    int16): activation codes 255 against rows of the grid's extreme weights. Every CPU must
    compute the codes' exact products: codes the kernel could saturate on are refused, the
    others (7-bit symmetric; asymmetric codes, whose UINT8 storage the kernel shifts by 128)
    are exact at every level."""
    n, f = 4, 64
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    integers = np.stack([np.full(f, high), np.full(f, low), np.where(np.arange(f) % 4 < 2, high, low),
                         np.random.default_rng(bits).integers(low, high + 1, f)])
    scale = np.full((n,) if granularity == "channel" else (), 0.01, np.float32)
    zero_point = None if symmetric else np.full(scale.shape, (low + high) // 2 + 3)
    codes = codes_of(integers, scale, zero_point, bits)
    quant = InputQuantizer(scale=1.0, zero_point=0, signed=False)
    x = np.full((3, f), 255.0, np.float32)
    form = matmul_integer_to_float(codes, None, quant, "x", "y", Fresh())
    if bits == 8:
        assert isinstance(form, str) and "saturate" in form
        return
    assert isinstance(form, OrtForm), form
    expected = reference(codes, x, quant)
    for level in LEVELS:
        np.testing.assert_allclose(run(model_of(form, 2), x, level), expected, rtol=1e-6)


def test_refusals() -> None:
    rng = np.random.default_rng(0)
    fresh = Fresh()
    blocked = make_codes(rng, 8, 64, 4, "block", True, False, 24)[0]
    assert "power of two" in str(matmul_nbits(blocked, None, "x", "y", fresh))
    assert "power of two" in str(matmul_nbits(make_codes(rng, 8, 64, 4, "channel", True, False)[0], None, "x",
                                              "y", fresh, block_size=24))
    assert "cannot be split" in str(matmul_nbits(make_codes(rng, 8, 64, 4, "block", True, False, 32)[0], None,
                                                 "x", "y", fresh, block_size=64))
    assert "do not fit" in str(matmul_nbits(make_codes(rng, 8, 64, 8, "channel", True, False)[0], None, "x",
                                            "y", fresh, kernel_bits=4))
    assert "per block" in str(matmul_integer_to_float(make_codes(rng, 8, 64, 8, "block", True, False, 32)[0],
                                                      None, InputQuantizer(0.1, 0, True), "x", "y", fresh))


def test_pack_bits_puts_the_first_value_in_the_low_bits() -> None:
    np.testing.assert_array_equal(pack_bits(np.array([[1, 2, 3, 15]]), 4), [[0x21, 0xF3]])
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 3, 0]), 2), [0b00111001])
    np.testing.assert_array_equal(pack_bits(np.array([7, 200]), 8), [7, 200])


def test_weight_codes_reject_what_they_cannot_mean() -> None:
    ones = GroupScales(np.ones((1, 1)), np.zeros((1, 1), np.int64), 1)
    with pytest.raises(ValueError, match="integers outside the 4-bit grid"):
        WeightCodes(np.array([[8]]), ones, Scheme(4))
    with pytest.raises(ValueError, match="scale shape"):
        WeightCodes(np.zeros((2, 40), np.int64), GroupScales(np.ones((2, 2)), np.zeros((2, 2), np.int64), 16),
                    Scheme(4, Granularity.BLOCK, 16))
    with pytest.raises(ValueError, match="zero_point shape"):
        WeightCodes(np.zeros((2, 4), np.int64), GroupScales(np.ones((2, 1)), np.zeros((3, 1), np.int64), 4),
                    Scheme(4, symmetric=False))
    with pytest.raises(ValueError, match="zero_point outside"):
        WeightCodes(np.zeros((1, 4), np.int64), GroupScales(np.ones((1, 1)), np.full((1, 1), 16), 4),
                    Scheme(4, symmetric=False))
