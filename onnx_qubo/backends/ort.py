"""The fastest forms onnxruntime 1.32's CPU provider runs, built from one layer's integer codes.

The portable output (integers -> ``DequantizeLinear`` -> ``Gemm(transB=1)``) is exact but slower
than float: the weight is dequantized on every run. The forms here compute the same dequantized
weights with onnxruntime's own integer kernels, one function per form; each returns the nodes and
initializers of the form, or a string saying why the layer cannot use it:

- :func:`matmul_nbits`: weight-only, ``com.microsoft.MatMulNBits`` (float activations);
- :func:`matmul_integer_to_float`: weights of up to 8 bits with 8-bit quantized activations,
  ``QuantizeLinear -> com.microsoft.MatMulIntegerToFloat`` (float output, float bias);
- :func:`gather_block_quantized`: an embedding table's row lookups (forms/gather.py),
  ``com.microsoft.GatherBlockQuantized``;
- ``ort_conv.qlinear_conv``: a Conv with 8-bit quantized input and output, ``QuantizeLinear ->
  QLinearConv -> DequantizeLinear`` (float in, float out; the output rounding is extra error).

The MatMul kernels read the weight as the layer's ``[n_out, f_in]`` codes and compute ``x @ W^T + bias`` on
activations of any rank >= 2 (batch axes first), like ``MatMul`` with a ``[f_in, n_out]`` weight.
Facts behind the choices (checked by ``tests/test_ort_forms.py`` and measured by
``benchmarks/inference.py``):

- MatMulNBits has fast (prepacked) CPU kernels for 4-bit weights with ``block_size`` in 16..256,
  and with ``accuracy_level=4`` (int8 activations inside the kernel) for 8-bit weights (blocks
  16..256) and 2-bit weights (blocks 32, 64, 128: within 1.5x the 4-bit kernel's time at batch 1,
  1.1-2x at batch 64, benchmarks/results/matmul_nbits_2bit.md), all with integer zero points
  (float ones, onnxruntime's own HQQ output, dequantize on every run: 24-76x slower at batch 1
  on a 2048x2048 layer, benchmarks/results/matmul_nbits_zero_points.md). Other combinations
  (2-bit at ``accuracy_level`` 0, or in blocks of 16 or 256; 8-bit at 0) fall back to
  dequantizing the whole weight on every run (refused here). So codes of 1-2 bits go to the
  2-bit kernel at ``accuracy_level`` 4, and otherwise, like 3-4 bit codes, to the 4-bit kernel,
  which stores them exactly (``u = q + 8``).
- A scale per row or per tensor is a MatMulNBits block scale repeated over the row's blocks: the
  dequantized weights are identical. So is a block of ``b`` inputs split into sub-blocks.
- With quantized activations, onnxruntime fuses ``DequantizeLinear`` pairs into a
  ``MatMul`` only when no ``Add`` follows (its MatMul+Add -> Gemm rewrite runs first, and a
  ``Gemm`` is only fused when its weight has a zero-point input and a ``QuantizeLinear`` follows,
  re-quantizing a float bias to INT32). Writing ``MatMulIntegerToFloat`` directly needs no fusion,
  keeps the bias float, and is as fast as the fused kernels. Its int8 x int8 kernel is slow on
  x86, so int8 activations are written as the identical uint8 quantization (zero point + 128).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.grid import InputQuantizer, WeightCodes

MS_DOMAIN = "com.microsoft"
SATURATION_FREE = 64  # u8s8 pair sums stay in int16 for stored weights within +-64: 2 * 255 * 64 < 2^15
NBITS_FAST_BLOCKS = (16, 32, 64, 128, 256)  # MLAS's prepacked 4-bit (and 8-bit) MatMulNBits kernels
NBITS2_FAST_BLOCKS = (32, 64, 128)  # its 2-bit kernels (accuracy_level 4 only)
Names = Callable[[str], str]  # hands out a fresh tensor/node name from a base name


@dataclass(frozen=True, eq=False)
class OrtForm:
    """Nodes reading the activation and writing the output, their initializers, the least
    opset version each domain needs, and the bits each weight code takes in them where a kernel
    packs them its own way (None: the bits of their ONNX integer type)."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    opsets: dict[str, int]
    weight_bits: int | None = None
    padded_inputs: int = 0  # zero codes the kernel stores after each row's inputs to fill its last block


def reference(codes: WeightCodes, x: np.ndarray, activation: InputQuantizer | None = None,
              int8_blocks: int = 0, bias: np.ndarray | None = None) -> np.ndarray:
    """What every form computes, in float64 numpy: ``q(x) @ W^T + bias``.

    ``q`` is ``activation``'s quantization, or with ``int8_blocks`` what MatMulNBits does at
    accuracy_level 4: each run of ``int8_blocks`` inputs of a row is rounded (half to even) to
    int8 with scale ``max|x| / 127``.
    """
    if activation is not None:
        x = activation.fake_quantize(x)
    if int8_blocks:
        f = x.shape[-1]
        padded = np.zeros((*x.shape[:-1], -(-f // int8_blocks) * int8_blocks))
        padded[..., :f] = x
        runs = padded.reshape(*x.shape[:-1], -1, int8_blocks)
        step = np.abs(runs).max(axis=-1, keepdims=True) / 127
        step[step == 0] = 1
        x = (np.rint(runs / step) * step).reshape(padded.shape)[..., :f]
    y = np.asarray(x, np.float64) @ codes.dequantize().T
    return y if bias is None else y + bias


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values along the last axis into bytes, first value in the lowest
    bits (MatMulNBits' layout); the last axis times ``bits`` must be a multiple of 8."""
    per_byte = 8 // bits
    grouped = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def matmul_nbits(codes: WeightCodes, bias: np.ndarray | None, activation: str, output: str, fresh: Names, *,
                 accuracy_level: int = 0, kernel_bits: int | None = None,
                 block_size: int | None = None, allow_slow: bool = False) -> OrtForm | str:
    """``com.microsoft.MatMulNBits(activation)`` computing ``x @ W^T + bias`` in float.

    Numpy meaning: ``reference(codes, x, bias=bias)``; the kernel stores ``u = q + 2^(kernel_bits-1)`` for
    signed codes (no zero-point input: it defaults to ``2^(kernel_bits-1)``) and ``u = q`` with
    packed uint8 zero points for unsigned ones (float zero points: in the scales' type), so
    ``(u - zp) * scale`` is exactly ``W``.

    ``kernel_bits`` (default: :func:`nbits_kernel_bits`) must hold the codes. The kernel's
    ``block_size`` (default: the largest of the kernel's fast blocks dividing the layer's block,
    else 32) must be a power of two >= 16 and divide the layer's block; per-row and per-tensor
    scales are repeated over the blocks.
    ``accuracy_level`` 0 (or 1) computes in float32 (output error of float rounding only);
    4 quantizes the activations to int8 per block of ``block_size`` inputs inside the kernel
    (``reference(codes, x, int8_blocks=block)``; fast also for 8-bit weights; about 0.5%
    relative output error on random layers).
    Kernels without a prepacked CPU implementation (2-bit and 8-bit below accuracy_level 4, 2-bit
    in blocks other than 32-128, blocks above 256) dequantize the whole weight on every run, slower
    than float: refused unless ``allow_slow`` (they compute correctly, N not a multiple of 4 included).
    """
    n, f = codes.integers.shape
    bits = kernel_bits if kernel_bits is not None else nbits_kernel_bits(codes, accuracy_level)
    if bits not in (2, 4, 8):
        return f"MatMulNBits takes 2, 4 or 8-bit weights, not {bits}"
    if codes.bits > bits:
        return f"{codes.bits}-bit codes do not fit MatMulNBits' {bits}-bit weights"
    if accuracy_level not in (0, 1, 2, 3, 4):
        return f"accuracy_level {accuracy_level} is not one of 0-4"
    fast_blocks = _fast_blocks(bits, accuracy_level)
    block = block_size if block_size is not None else (_largest_dividing(codes.block_size, fast_blocks or
                                                                         NBITS_FAST_BLOCKS)
                                                      if codes.block_size else 32)
    if block < 16 or block & (block - 1):
        return f"MatMulNBits' block_size must be a power of two >= 16, not {block}"
    if codes.block_size and codes.block_size % block:
        return (f"the layer's blocks of {codes.block_size} inputs cannot be split into "
                f"MatMulNBits blocks of {block} (a power of two >= 16)")
    float_zero = codes.scheme.float_zero_point
    if not allow_slow and float_zero:
        return ("onnxruntime 1.32 has no prepacked CPU kernel for MatMulNBits with float zero points: it would "
                "dequantize on every run (benchmarks/results/matmul_nbits_zero_points.md)")
    if not allow_slow and block not in fast_blocks:
        return (f"onnxruntime 1.32 has no prepacked CPU kernel for {bits}-bit MatMulNBits with block "
                f"{block} at accuracy_level {accuracy_level}: it would dequantize on every run")
    k_blocks = -(-f // block)
    padded = k_blocks * block
    offset = 1 << (bits - 1) if codes.signed else 0
    per_block = codes.block_size // block if codes.block_size else 0

    def blocks(values: np.ndarray) -> np.ndarray:  # one per scale group -> one per kernel block [n, k_blocks]
        if values.ndim == 2:
            return np.repeat(values, per_block, axis=1)[:, :k_blocks]
        return np.broadcast_to(values.reshape(-1, 1), (n, k_blocks))

    zero_blocks = None if codes.zero_point is None or float_zero else blocks(codes.zero_point).astype(np.int64)
    unsigned = np.empty((n, padded), np.int64)
    unsigned[:, :f] = codes.integers  # codes may be int8: widen before the offset
    unsigned[:, :f] += offset
    # the padding dequantizes to 0 (with float zero points it reads scale * -zero_point: its activations are 0)
    unsigned[:, f:] = 0 if float_zero else offset if zero_blocks is None else zero_blocks[:, -1:]
    names = [fresh(f"{output}_{suffix}") for suffix in ("B", "scales", "zero_points", "bias")]
    initializers = [
        numpy_helper.from_array(pack_bits(unsigned, bits).reshape(n, k_blocks, block * bits // 8), names[0]),
        numpy_helper.from_array(np.ascontiguousarray(blocks(codes.scale), codes.scheme.scale_dtype), names[1]),
    ]
    inputs = [activation, names[0], names[1], "", "", ""]
    if float_zero:  # in the scales' type, one per block (onnxruntime's HQQ output)
        assert codes.zero_point is not None
        initializers.append(numpy_helper.from_array(
            np.ascontiguousarray(blocks(codes.zero_point), codes.scheme.scale_dtype), names[2]))
        inputs[3] = names[2]
    elif zero_blocks is not None:
        row_bytes = -(-k_blocks * bits // 8)
        padded_zero = np.zeros((n, row_bytes * 8 // bits), np.int64)
        padded_zero[:, :k_blocks] = zero_blocks
        initializers.append(numpy_helper.from_array(pack_bits(padded_zero, bits), names[2]))
        inputs[3] = names[2]
    if bias is not None:
        initializers.append(numpy_helper.from_array(np.asarray(bias, codes.scheme.scale_dtype), names[3]))
        inputs[5] = names[3]
    node = helper.make_node("MatMulNBits", _trim(inputs), [output], name=fresh(f"{output}_MatMulNBits"),
                            domain=MS_DOMAIN, K=f, N=n, bits=bits, block_size=block,
                            accuracy_level=accuracy_level)
    return OrtForm([node], initializers, {MS_DOMAIN: 1}, weight_bits=bits, padded_inputs=padded - f)


def nbits_kernel_bits(codes: WeightCodes, accuracy_level: int) -> int:
    """The MatMulNBits weight width for ``codes``: 2 for codes of 1-2 bits where the 2-bit kernel
    is fast (``accuracy_level`` 4, blocks of the layer that split into 32, 64 or 128), else 4
    for codes of 1-4 bits and 8 above."""
    if codes.bits <= 2 and accuracy_level == 4 and two_bit_kernel_takes(codes.block_size):
        return 2
    return 4 if codes.bits <= 4 else 8


def two_bit_kernel_takes(block_size: int) -> bool:
    """Whether a layer's blocks of ``block_size`` inputs (0: a scale per row) split into blocks
    the prepacked 2-bit MatMulNBits kernel runs (32, 64 or 128)."""
    return not block_size or any(block_size % b == 0 for b in NBITS2_FAST_BLOCKS)


def dividing_fast_block(widths: Collection[int], bits: Collection[int], accuracy_level: int) -> int | None:
    """The largest block size with a prepacked MatMulNBits kernel for every width in ``bits`` that
    divides every input count in ``widths`` (None: there is none)."""
    fast = set.intersection(*(set(_fast_blocks(b, accuracy_level)) for b in bits)) if bits else set()
    return max((b for b in fast if all(w % b == 0 for w in widths)), default=None)


def _fast_blocks(bits: int, accuracy_level: int) -> tuple[int, ...]:
    """The ``block_size`` values with a prepacked CPU kernel for ``bits``-bit MatMulNBits weights."""
    if bits == 4:
        return NBITS_FAST_BLOCKS
    return {2: NBITS2_FAST_BLOCKS, 8: NBITS_FAST_BLOCKS}.get(bits, ()) if accuracy_level == 4 else ()


def int8_weights(codes: WeightCodes) -> tuple[np.ndarray, np.ndarray | None] | str:
    """8-bit kernels' weights: the codes as INT8 (unsigned ones shifted by ``2^(bits-1)``, their
    zero point too: the same numbers) and the zero point, or why they cannot be run exactly.

    On x86 CPUs without VNNI, onnxruntime's u8s8 GEMM adds pairs of products in int16
    (VPMADDUBSW; UINT8 weights are shifted to INT8 first), which saturates once two stored
    weights' magnitudes pass 128 together: stored codes beyond +-SATURATION_FREE are refused, so
    a written kernel computes its codes exactly on every CPU."""
    shift = 0 if codes.signed else 1 << (codes.bits - 1)
    integers = codes.integers - shift
    if np.abs(integers).max(initial=0) > SATURATION_FREE:
        return (f"weight codes beyond +-{SATURATION_FREE} would saturate onnxruntime's 8-bit kernel on CPUs "
                f"without VNNI (7 bits or fewer run exactly everywhere)")
    zero_point = None if codes.zero_point is None else (codes.zero_point - shift).astype(np.int8)
    return integers.astype(np.int8), zero_point


def matmul_integer_to_float(codes: WeightCodes, bias: np.ndarray | None, quant: InputQuantizer, activation: str,
                            output: str, fresh: Names) -> OrtForm | str:
    """``QuantizeLinear(activation) -> com.microsoft.MatMulIntegerToFloat`` with a float bias.

    Numpy meaning: ``reference(codes, x, quant, bias=bias)``: ``y = a_scale * b_scale[n] * sum_k (xq - xz)
    (wq[n, k] - wz[n]) + bias[n]`` with exact int32 accumulation. Signed activations are written
    as uint8 with zero point + 128 (the same numbers; onnxruntime's s8s8 kernel is slow on x86).
    Weights: codes of up to 8 bits per tensor or per row, as ``int8_weights`` stores them (codes
    that could saturate the kernel on some CPUs are refused: the layer keeps the portable form).
    """
    if codes.scale.ndim == 2:
        return "MatMulIntegerToFloat takes a weight scale per tensor or per output, not per block"
    weights = int8_weights(codes)
    if isinstance(weights, str):
        return weights
    integers, zero_point = weights
    a_zero = quant.zero_point + (128 if quant.signed else 0)
    if not 0 <= a_zero <= 255:
        raise ValueError(f"activation zero point {quant.zero_point} is outside its 8-bit type")
    names = [fresh(f"{output}_{suffix}") for suffix in
             ("a_scale", "a_zero_point", "a_quantized", "B", "b_scale", "b_zero_point", "bias")]
    initializers = [
        numpy_helper.from_array(np.array(quant.scale, np.float32), names[0]),
        numpy_helper.from_array(np.array(a_zero, np.uint8), names[1]),
        numpy_helper.from_array(np.ascontiguousarray(integers.T), names[3]),
        numpy_helper.from_array(np.asarray(codes.scale, np.float32), names[4]),
    ]
    inputs = [names[2], names[3], names[0], names[4], names[1], "", ""]
    if zero_point is not None:
        initializers.append(numpy_helper.from_array(zero_point, names[5]))
        inputs[5] = names[5]
    if bias is not None:
        initializers.append(numpy_helper.from_array(np.asarray(bias, np.float32), names[6]))
        inputs[6] = names[6]
    nodes = [
        helper.make_node("QuantizeLinear", [activation, names[0], names[1]], [names[2]],
                         name=fresh(f"{output}_QuantizeLinear")),
        helper.make_node("MatMulIntegerToFloat", _trim(inputs), [output],
                         name=fresh(f"{output}_MatMulIntegerToFloat"), domain=MS_DOMAIN),
    ]
    return OrtForm(nodes, initializers, {"": 10, MS_DOMAIN: 1}, weight_bits=8)


def gather_block_quantized(codes: WeightCodes, indices: str, output: str, fresh: Names) -> OrtForm | str:
    """``com.microsoft.GatherBlockQuantized``: rows ``indices`` of the table ``codes`` ([V, d],
    a scale per row or per block of a row), dequantized: ``codes.dequantize()[indices]`` in
    float32, ``indices.shape + [d]``.

    The table is stored as uint8 (``bits`` 2, 4 or 8: codes of 1-2, 3-4, 5-8 bits; first code in
    the low bits), signed codes as ``u = q + 2^(bits-1)`` with no zero-point input (the kernel's
    default is ``2^(bits-1)``), unsigned ones with packed uint8 zero points. The kernel's
    ``block_size`` (a power of two >= 16) spans a whole row for row scales; a table's blocks of
    ``b`` are split into kernel blocks of the largest power of two in 16..256 dividing ``b``, each
    with its block's scale. Refused: rows that do not fill whole bytes (the kernel widens the
    packed last axis to whole bytes), blocks no power of two >= 16 divides.
    Caveat (onnxruntime 1.32): an index outside ``[-V, V)`` yields a row of zeros where ``Gather``
    fails (tests/test_embeddings.py)."""
    v, d = codes.integers.shape
    bits = 2 if codes.bits <= 2 else 4 if codes.bits <= 4 else 8
    per_byte = 8 // bits
    if d % per_byte:
        return (f"GatherBlockQuantized stores {bits}-bit codes {per_byte} per byte and widens each row to whole "
                f"bytes: a row of {d} does not fill them")
    if codes.block_size:
        block = _largest_dividing(codes.block_size, NBITS_FAST_BLOCKS)
        if block < 16 or codes.block_size % block:
            return (f"the table's blocks of {codes.block_size} cannot be split into GatherBlockQuantized blocks "
                    "(a power of two >= 16)")
    else:
        block = max(16, 1 << (d - 1).bit_length())  # one kernel block spans the row
    k_blocks = -(-d // block)
    per_block = codes.block_size // block if codes.block_size else 0

    def blocks(values: np.ndarray) -> np.ndarray:  # one per scale group -> one per kernel block [V, k_blocks]
        if values.ndim == 2:
            return np.repeat(values, per_block, axis=1)[:, :k_blocks]
        return np.broadcast_to(values.reshape(-1, 1), (v, k_blocks))

    offset = 1 << (bits - 1) if codes.signed else 0
    unsigned = codes.integers + offset
    data = unsigned.astype(np.uint8) if bits == 8 else pack_bits(unsigned, bits)
    names = [fresh(f"{output}_{suffix}") for suffix in ("table", "scales", "zero_points")]
    scales = np.ascontiguousarray(blocks(codes.scale), codes.scheme.scale_dtype)
    initializers = [numpy_helper.from_array(data, names[0]), numpy_helper.from_array(scales, names[1])]
    inputs = [names[0], indices, names[1]]
    if codes.zero_point is not None:
        zero = np.zeros((v, -(-k_blocks // per_byte) * per_byte), np.int64)
        zero[:, :k_blocks] = blocks(codes.zero_point)
        initializers.append(numpy_helper.from_array(zero.astype(np.uint8) if bits == 8 else pack_bits(zero, bits),
                                                    names[2]))
        inputs.append(names[2])
    node = helper.make_node("GatherBlockQuantized", inputs, [output], name=fresh(f"{output}_GatherBlockQuantized"),
                            domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=block, bits=bits)
    return OrtForm([node], initializers, {MS_DOMAIN: 1})


def _largest_dividing(block: int, kernel_blocks: tuple[int, ...]) -> int:
    """The largest of ``kernel_blocks`` dividing ``block`` (the fastest kernel block that splits
    the layer's blocks exactly), else ``block`` itself, which is then refused."""
    return next((c for c in reversed(kernel_blocks) if block % c == 0), block)


def _trim(inputs: list[str]) -> list[str]:
    """Drop trailing empty (omitted) optional inputs."""
    while inputs and not inputs[-1]:
        inputs.pop()
    return inputs


