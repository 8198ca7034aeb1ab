"""Which kernel runs each layer: the portable DequantizeLinear form, or (format ``ort``) one of
onnxruntime's fast kernels built from the very same codes (ort.py, ort_conv.py).

``choose_kernel`` decides per layer, correct first (the builders refuse shapes and bit widths their
kernels compute wrongly or slowly), and says why a layer falls back to the portable form.
onnxruntime has no weight-only integer Conv kernel, so a Conv has a fast form only with quantized
inputs: QLinearConv, which also quantizes the Conv's output (its range is calibrated for it:
``needs_output_range``). ``GatherBlockQuantized`` returns a row of zeros for an index outside the
table where ``Gather`` fails (tests/test_embeddings.py).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.choice import Choice
from ..core.errors import OptionError
from ..core.grid import Granularity, InputQuantizer, WeightCodes
from ..core.types import DenseLayer, QuantizedLayer
from ..core.views import ConvGeometry
from .ort import (
    OrtForm,
    dividing_fast_block,
    gather_block_quantized,
    matmul_integer_to_float,
    matmul_nbits,
    two_bit_kernel_takes,
)
from .ort_conv import qlinear_conv, qlinear_conv_slow

KERNEL_OPS = ("Gemm", "MatMul", "Conv")  # MatMulNBits / MatMulIntegerToFloat; QLinearConv (quantized inputs)
PORTABLE = "DequantizeLinear"
PORTABLE_TABLE = "Gather+Mul"  # an embedding table's portable lookup (forms/gather.py)


class Format(Choice):
    QDQ = "qdq"  # standard ONNX: integers -> DequantizeLinear -> Gemm, runs anywhere
    ORT = "ort"  # onnxruntime's CPU kernels (com.microsoft MatMulNBits / MatMulIntegerToFloat, QLinearConv)


KERNEL_BLOCK = 16  # MatMulNBits' block_size: a power of two, at least this


def splits_into_kernel_blocks(size: int) -> bool:
    """Whether blocks of ``size`` inputs split into MatMulNBits blocks (a power of two, at least
    ``KERNEL_BLOCK``): exactly when ``KERNEL_BLOCK`` divides it."""
    return size % KERNEL_BLOCK == 0


def check_accuracy_level(accuracy_level: int) -> None:
    """An OptionError unless ``accuracy_level`` is one MatMulNBits takes (0-4)."""
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise OptionError(f"{{ort_accuracy_level}} must be 0-4, got {accuracy_level}", "ort_accuracy_level")


def auto_accuracy_level(language_model: bool, bits: Collection[int], block_size: int = 0) -> int:
    """The accuracy level ``auto`` stands for: 4 (int8 activations inside MatMulNBits) for a
    language model, as onnxruntime-genai's builder writes its CPU int4 models (decoding is bound
    by these kernels, and 4 is their fast path), for 8-bit weights, which MatMulNBits runs fast
    at 4 only, and for 2-bit weights in blocks of ``block_size`` (0: a scale per row) that the
    2-bit kernel takes, fast at 4 only (at 0 they take the 4-bit kernel's room; the int8
    activations moved 2-bit MiniLM's output error by 0.1%: benchmarks/results/
    matmul_nbits_2bit.md); else 0 (float
    compute: the output equals the DequantizeLinear model's)."""
    two_bit = min(bits) <= 2 and two_bit_kernel_takes(block_size)
    return 4 if language_model or min(bits) > 4 or two_bit else 0


def check_format(format: Format, accuracy_level: int | None, activations: str, granularity: Granularity,
                 block_size: int, bits: Collection[int], auto_scheme: bool = False) -> None:
    """An OptionError for what format ort cannot serve for any layer (single layers fall back to the
    portable form, reported): ``activations`` is the option's value ("none": weight-only),
    ``block_size`` the scheme's (0: a scale per row or tensor), ``bits`` every bit width the run
    uses; ``auto_scheme`` tries schemes format ort serves only some of."""
    quantized_inputs = activations != "none"
    if accuracy_level is None:  # auto: checked as it resolves for a model that is not a language model
        weight_only_ort = format == Format.ORT and not quantized_inputs
        accuracy_level = auto_accuracy_level(False, bits, block_size) if weight_only_ort else 0
    check_accuracy_level(accuracy_level)
    if accuracy_level and format != Format.ORT:
        raise OptionError(f"{{ort_accuracy_level}} applies to {{format}} ort weight-only layers (MatMulNBits), "
                          f"not to {{format}} {format.value}", "ort_accuracy_level", "format")
    if accuracy_level and quantized_inputs:
        raise OptionError(f"{{ort_accuracy_level}} applies to weight-only layers (MatMulNBits), not with "
                          f"{{activations}} {activations}", "ort_accuracy_level", "activations")
    if format != Format.ORT:
        return
    if auto_scheme:
        raise OptionError("{auto_scheme} tries blocks of 32 and per channel, symmetric and not; {format} ort "
                          "serves only some of them: use {format} qdq", "auto_scheme", "format")
    if quantized_inputs and granularity == Granularity.BLOCK:
        raise OptionError("{format} ort with quantized inputs runs MatMulIntegerToFloat, which takes one weight "
                          "scale per output or per tensor, not blocks: use {granularity} channel or tensor, "
                          "or {format} qdq", "format", "granularity")
    if not quantized_inputs:
        if min(bits) > 4 and accuracy_level != 4:
            raise OptionError("{format} ort weight-only: onnxruntime 1.32's MatMulNBits has a fast float kernel "
                              "for 1-4 bit weights only; use {bits} 4 or less, {ort_accuracy_level} 4 (int8 "
                              "activations inside the kernel), {activations} int8/uint8, or {format} qdq",
                              "format", "bits", "ort_accuracy_level", "activations")
        if granularity == Granularity.BLOCK and not splits_into_kernel_blocks(block_size):
            raise OptionError(f"{{format}} ort weight-only needs blocks that split into MatMulNBits blocks (a "
                              f"power of two >= {KERNEL_BLOCK}), not {{block_size}} {block_size}: use a multiple of "
                              f"{KERNEL_BLOCK}, or {{format}} qdq", "format", "block_size")


@dataclass(frozen=True, eq=False)
class FastLayer:
    """A layer's codes as one of onnxruntime's kernels takes them; ``build`` writes the nodes."""

    codes: WeightCodes  # Gemm's alpha folded into the scales
    bias: np.ndarray | None  # [n] as the kernel adds it (or None)
    activation: InputQuantizer | None  # quantized inputs: MatMulIntegerToFloat (QLinearConv)
    accuracy_level: int  # MatMulNBits: 0 float compute, 4 int8 activations inside the kernel
    conv: ConvGeometry | None = None  # a Conv: QLinearConv, its bias correction folded into ``bias``
    output: InputQuantizer | None = None  # QLinearConv's output quantization

    @property
    def kernel(self) -> str:
        if self.conv is not None:
            return "QLinearConv"
        return "MatMulNBits" if self.activation is None else "MatMulIntegerToFloat"

    def build(self, activation: str, output: str, fresh) -> OrtForm | str:
        if self.conv is not None:
            if self.activation is None or self.output is None:
                raise ValueError("QLinearConv needs the input and output quantization")
            return qlinear_conv(self.codes, self.bias, self.conv, self.activation, self.output, activation, output,
                                fresh)
        if self.activation is None:
            return matmul_nbits(self.codes, self.bias, activation, output, fresh, accuracy_level=self.accuracy_level)
        return matmul_integer_to_float(self.codes, self.bias, self.activation, activation, output, fresh)


@dataclass(frozen=True)
class KernelChoice:
    layer: str
    kernel: str
    fallback: str | None = None  # why the fast kernel was not used (format ort only)
    bits: int | None = None  # bits per code in the kernel's weights (None: the ONNX integer type's)
    padding: int = 0  # zero codes the kernel stores after each row's inputs to fill its last block


def needs_output_range(layer: DenseLayer, format: Format, quantized_inputs: bool) -> bool:
    """Whether ``layer`` may run as QLinearConv, which quantizes its output too: the range of its
    output is then calibrated (a Conv of a shape the kernel runs faster than float, format ort,
    quantized inputs)."""
    return (format == Format.ORT and quantized_inputs and layer.view.geometry is not None
            and qlinear_conv_slow(layer.view.geometry) is None)


def choose_kernel(q: QuantizedLayer, bias: np.ndarray | None, has_other_bias: bool,
                  format: Format, accuracy_level: int) -> tuple[FastLayer | None, KernelChoice]:
    """The fast kernel for layer ``q``, or None and why not.
    ``bias``: the [n] bias the kernel must add (None: none, or it stays in a following Add);
    ``has_other_bias``: the node has a bias the kernel cannot take (e.g. a Gemm's C that is not
    one value per output). A Conv's kernel (QLinearConv) also adds the bias correction
    ``q.bias_shift`` to its bias."""
    name = q.layer.name
    if format == Format.QDQ:
        return None, KernelChoice(name, PORTABLE)
    if q.layer.op_type not in KERNEL_OPS:
        return None, KernelChoice(name, PORTABLE, f"no faster onnxruntime kernel for a {q.layer.op_type} layer yet")
    geometry = q.layer.view.geometry
    if geometry is not None and q.input_quantizer is None:
        return None, KernelChoice(name, PORTABLE, "onnxruntime has no weight-only integer Conv kernel")
    if geometry is not None and q.output_quantizer is None:
        return None, KernelChoice(name, PORTABLE, qlinear_conv_slow(geometry) or "its output range was not calibrated")
    if has_other_bias:
        return None, KernelChoice(name, PORTABLE, "its bias is not one value per output")
    if geometry is not None and q.bias_shift is not None:
        bias = (0.0 if bias is None else np.asarray(bias, np.float64)) + q.bias_shift
    fast = FastLayer(q.codes.scaled(q.layer.gain), bias, q.input_quantizer, accuracy_level, geometry,
                     q.output_quantizer)
    refusal = fast.build("x", "y", lambda base: base)  # a dry run: only checks, names do not matter
    if isinstance(refusal, str):
        return None, KernelChoice(name, PORTABLE, refusal)
    return fast, KernelChoice(name, fast.kernel, bits=refusal.weight_bits, padding=refusal.padded_inputs)


def padding_notes(quantized: Sequence[QuantizedLayer], kernels: Sequence[KernelChoice],
                  accuracy_level: int) -> list[str]:
    """Where MatMulNBits pads the rows of layers in blocks that do not divide their input count K
    (SmolLM2's K = 576 in blocks of 128: 640 codes per row) by more than 1% of their codes: bytes
    for no weight, where blocks dividing K store none with finer scales (SmolLM2 at 2 bits: the
    same size in blocks of 64, perplexity 36.6 against 38.1; docs/llm.md, "Two-bit kernels").
    Layers with a scale per row are left out: their kernel blocks only repeat the scale, and
    padding the last one costs less than more scales."""
    padded = [(q, k) for q, k in zip(quantized, kernels) if k.padding and q.codes.block_size]
    codes = sum(q.layer.shape[0] * q.layer.shape[1] for q, _ in padded)
    added = sum(q.layer.shape[0] * k.padding for q, k in padded)
    if not padded or added <= 0.01 * codes:
        return []
    widths = {q.layer.shape[1]: q.layer.shape[1] + k.padding for q, k in padded}
    rows = ", ".join(f"K = {k} -> {widths[k]}" for k in sorted(widths))
    layers = f"{len(padded)} MatMulNBits layer{'s pad' if len(padded) > 1 else ' pads'}"
    note = (f"{layers} each row to whole blocks ({rows}): "
            f"{added / codes:.0%} more codes in those layers, for no weight")
    block = dividing_fast_block(widths, {k.bits or 4 for _, k in padded}, accuracy_level)
    if block is not None:
        note += f"; --block-size {block} divides {'it' if len(widths) == 1 else 'each'}: no padding, finer scales"
    return [note]


def choose_table_kernel(name: str, codes: WeightCodes, format: Format) -> tuple[bool, KernelChoice]:
    """Whether embedding table ``name`` runs as onnxruntime's GatherBlockQuantized (format ort),
    or keeps the portable lookup and why."""
    if format == Format.QDQ:
        return False, KernelChoice(name, PORTABLE_TABLE)
    refusal = gather_block_quantized(codes, "indices", "y", lambda base: base)  # a dry run: only checks
    if isinstance(refusal, str):
        return False, KernelChoice(name, PORTABLE_TABLE, refusal)
    return True, KernelChoice(name, "GatherBlockQuantized")
