"""onnxruntime's QLinearConv built from one Conv's integer codes: ``QuantizeLinear -> QLinearConv ->
DequantizeLinear`` (float in, float out; the output rounding is extra error), its numpy meaning, and
the shapes it runs slower than float Conv (benchmarks/conv_forms.py).
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from ..calibration.patches import patches
from ..core.grid import InputQuantizer, WeightCodes
from ..core.views import ConvGeometry
from .ort import Names, OrtForm, int8_weights

# QLinearConv is slower than float Conv below these input channels per group (benchmarks/conv_forms.py):
QLINEAR_CONV_MIN_CHANNELS = 8  # one group: 4.4x float's time at 1 channel, 1.3x at 4, 0.8x at 8
QLINEAR_CONV_MIN_GROUP_CHANNELS = 32  # several groups: 1.2x at 16 per group, 0.6x at 32; depthwise 1.1x


def qlinear_conv_slow(geometry: ConvGeometry) -> str | None:
    """Why QLinearConv would run this Conv slower than float Conv (too few input channels per
    group for its integer GEMM to pay for quantizing, transposing and requantizing), or None."""
    per_group = geometry.in_channels // geometry.groups
    least = QLINEAR_CONV_MIN_CHANNELS if geometry.groups == 1 else QLINEAR_CONV_MIN_GROUP_CHANNELS
    if per_group >= least:
        return None
    shape = ("a depthwise Conv" if per_group == 1 and geometry.channels_per_group == 1 and geometry.groups > 1
             else f"{per_group} input channel{'s' * (per_group > 1)} per group"
             + (f" in {geometry.groups} groups" if geometry.groups > 1 else ""))
    return (f"onnxruntime's QLinearConv runs slower than float Conv on {shape} (it needs at least {least} input "
            "channels per group to be faster; benchmarks/conv_forms.py)")


def qlinear_conv(codes: WeightCodes, bias: np.ndarray | None, geometry: ConvGeometry, quant: InputQuantizer,
                 out: InputQuantizer, activation: str, output: str, fresh: Names) -> OrtForm | str:
    """``QuantizeLinear(activation) -> QLinearConv -> DequantizeLinear``: a Conv (``geometry``,
    weights ``codes`` [M, C/groups * k1..kd]) whose input is quantized by ``quant`` and whose
    output is quantized by ``out`` and dequantized again, so the graph around stays float.

    Numpy meaning: ``qlinear_conv_reference`` on the written integers: an int32 sum over each
    patch of ``(xq - xz) (wq - wz)`` plus the bias, times ``x_scale * w_scale[m] / y_scale`` in
    float32, rounded half to even, plus ``y_zero_point``, saturated; then dequantized. The float
    bias (with any bias correction already in it) is stored as INT32 at ``x_scale * w_scale[m]``.
    Activations and output are written as uint8 (signed ones with zero point + 128: the same
    numbers), weights as ``int8_weights`` stores them. onnxruntime's CPU kernel takes one
    weight zero point for all channels and no block scales; shapes it runs slower than float
    are refused (``qlinear_conv_slow``).
    """
    n, f = codes.integers.shape
    if codes.scale.ndim == 2:
        return "QLinearConv takes a weight scale per tensor or per output channel, not per block"
    if codes.zero_point is not None and np.unique(codes.zero_point).size > 1:
        return ("onnxruntime's QLinearConv takes one weight zero point for all channels; these asymmetric weights "
                "have one per channel (use symmetric weights)")
    slow = qlinear_conv_slow(geometry)
    if slow is not None:
        return slow
    x_scale, y_scale = np.float32(quant.scale), np.float32(out.scale)
    bias_scale = np.float64(x_scale) * np.broadcast_to(np.asarray(codes.scale, np.float32), (n,)).astype(np.float64)
    int_bias = None
    if bias is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            int_bias = np.rint(np.asarray(bias, np.float64) / bias_scale)
        if not np.isfinite(int_bias).all() or np.abs(int_bias).max() > np.iinfo(np.int32).max:
            return "the bias does not fit INT32 at the input scale times the weight scale"
    weights = int8_weights(codes)
    if isinstance(weights, str):
        return weights
    integers, zero_point = weights
    w_zero = 0 if zero_point is None else int(zero_point.reshape(-1)[0])
    largest = 255 * f * int(np.abs(integers.astype(np.int64) - w_zero).max(initial=0))
    if largest + (0 if int_bias is None else np.abs(int_bias).max()) >= 2 ** 31:
        return f"the int32 accumulator could overflow over {f} weights"
    names = [fresh(f"{output}_{suffix}") for suffix in ("x_scale", "x_zero_point", "x_quantized", "W", "w_scale",
                                                         "w_zero_point", "y_scale", "y_zero_point", "y_quantized", "B")]
    weight_shape = (n, geometry.in_channels // geometry.groups, *geometry.kernel)
    initializers = [
        numpy_helper.from_array(np.array(x_scale, np.float32), names[0]),
        numpy_helper.from_array(np.array(quant.zero_point + 128 * quant.signed, np.uint8), names[1]),
        numpy_helper.from_array(integers.reshape(weight_shape), names[3]),
        numpy_helper.from_array(np.asarray(codes.scale, np.float32), names[4]),
        numpy_helper.from_array(np.array(w_zero, np.int8), names[5]),
        numpy_helper.from_array(np.array(y_scale, np.float32), names[6]),
        numpy_helper.from_array(np.array(out.zero_point + 128 * out.signed, np.uint8), names[7]),
    ]
    inputs = [names[2], names[0], names[1], names[3], names[4], names[5], names[6], names[7]]
    if int_bias is not None:
        initializers.append(numpy_helper.from_array(int_bias.astype(np.int32), names[9]))
        inputs.append(names[9])
    padding = {"pads": list(geometry.pads)} if geometry.auto_pad == "NOTSET" else {"auto_pad": geometry.auto_pad}
    nodes = [
        helper.make_node("QuantizeLinear", [activation, names[0], names[1]], [names[2]],
                         name=fresh(f"{output}_QuantizeLinear")),
        helper.make_node("QLinearConv", inputs, [names[8]], name=fresh(f"{output}_QLinearConv"),
                         kernel_shape=list(geometry.kernel), strides=list(geometry.strides),
                         dilations=list(geometry.dilations), group=geometry.groups, **padding),
        helper.make_node("DequantizeLinear", [names[8], names[6], names[7]], [output],
                         name=fresh(f"{output}_DequantizeLinear")),
    ]
    return OrtForm(nodes, initializers, {"": 10}, weight_bits=8)


def qlinear_conv_reference(xq: np.ndarray, inputs: list[np.ndarray], geometry: ConvGeometry) -> np.ndarray:
    """QLinearConv's output codes, in numpy, from its input codes ``xq [B, C, *spatial]`` and its
    other inputs as arrays: ``x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
    y_zero_point[, B]``. The patches of ``xq - x_zero_point`` (padding reads as the zero point)
    times ``w - w_zero_point`` summed exactly, plus B; converted to float32 and multiplied by the
    float32 ``x_scale * w_scale / y_scale``; rounded half to even; ``y_zero_point`` added;
    saturated to its type."""
    x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero, *rest = inputs
    m = geometry.out_channels
    columns = patches(xq.astype(np.float64) - x_zero.astype(np.float64), geometry)  # [groups, rows, f]
    flat = w.reshape(m, -1).astype(np.float64) - w_zero.astype(np.float64)
    sums = np.concatenate([columns[g] @ flat[geometry.rows_of(g)].T for g in range(geometry.groups)], axis=1)
    acc = np.rint(sums).astype(np.int64) + (rest[0].astype(np.int64) if rest else 0)  # [rows, M]
    multiplier = (np.float32(x_scale) * np.asarray(w_scale, np.float32)) / np.float32(y_scale)
    value = acc.astype(np.float32) * multiplier
    info = np.iinfo(y_zero.dtype)
    codes = np.clip(np.rint(value).astype(np.int64) + int(y_zero), info.min, info.max)
    spatial = geometry.output_shape(tuple(xq.shape[2:]))
    return np.moveaxis(codes.reshape(len(xq), *spatial, m), -1, 1)
