"""From each layer's integers to the graph: the pass records, and the passes that write them.

``rewrite`` raises the opset as the integer types and the scheme require, lowers every layer
(each layer's form rewrites its own node: forms/; with format ``ort`` through the kernel
kernels.py chooses), and checks the result with onnx's full checker. A bias correction goes into
the layer's float bias where it has one, a Conv's new ``B`` where it has none, QLinearConv's INT32
bias, else an ``Add`` after the node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import onnx

from .. import passes
from ..backends import portable
from ..backends.kernels import Format, KernelChoice, choose_kernel, choose_table_kernel
from ..core import external
from ..core.errors import ModelError, QuboError, RuntimeFailure
from ..core.types import QuantizedLayer
from ..forms.gather import TABLE_OPSET, LowerTables, QuantizedTable, TableLowering
from ..passes import (
    CheckModel,
    GraphPass,
    InsertDequantize,
    PassFailed,
    PassResult,
    QuantizedWeight,
    RaiseOpset,
    ReinferDeclaredShapes,
    UnsupportedModel,
)
from ..passes.insert_dequantize import dequantized
from ..passes.packed_codes import PACKING_OPSET

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Rewritten:
    model: onnx.ModelProto
    kernels: list[KernelChoice]  # per layer, then per table: the kernel that runs it (and why not a faster one)
    notes: list[str]  # what else was changed in the graph, and why


def run_passes(model: onnx.ModelProto, graph_passes: Sequence[GraphPass]) -> PassResult:
    """``passes.run_passes`` in the library's terms, the one place onnx_qubo runs passes: a model a
    pass cannot handle is a ModelError; an error of the library's own raised inside a pass (a
    form's, external.read_array's) is itself; any other failure a RuntimeFailure naming the pass,
    the original exception its ``__cause__``."""
    try:
        return passes.run_passes(model, graph_passes)
    except UnsupportedModel as exc:
        raise ModelError(str(exc)) from None
    except PassFailed as exc:
        cause = exc.__cause__
        if isinstance(cause, QuboError):
            raise cause from cause.__cause__  # as raised, its own cause kept
        raise RuntimeFailure(str(exc)) from exc.__cause__


def rewrite(model: onnx.ModelProto, quantized: list[QuantizedLayer], format: Format = Format.QDQ,
            accuracy_level: int = 0, tables: Sequence[QuantizedTable] = (), packed: bool = False) -> Rewritten:
    """Integer initializers (DequantizeLinear, or onnxruntime kernels with format ``ort``) in place
    of the float weights and of the embedding ``tables``, checked; ``packed``: DequantizeLinear's
    codes narrower than their type at their own width (passes/packed_codes.py)."""
    weights, kernels = [], []
    for q in quantized:
        weight, kernel = quantized_weight(q, format, accuracy_level, packed)
        weights.append(weight)
        kernels.append(kernel)
        log.info("layer '%s' (%s): %s weights, %s%s", q.layer.name, q.layer.label,
                 onnx.TensorProto.DataType.Name(q.codes.scheme.grid.storage[0]), kernel.kernel,
                 f" (not faster: {kernel.fallback})" if kernel.fallback else "")
    lowerings = []
    for table in tables:
        fast, kernel = choose_table_kernel(table.table.name, table.codes, format)
        lowerings.append(TableLowering(table, fast))
        kernels.append(kernel)
        log.info("table '%s': %d-bit rows, %s%s", table.table.name, table.codes.bits, kernel.kernel,
                 f" (not faster: {kernel.fallback})" if kernel.fallback else "")
    target_opset = max([q.codes.scheme.opset for q in quantized] + [TABLE_OPSET] * bool(tables)
                       + [PACKING_OPSET] * any(w.weight.packed_bits for w in weights))
    steps: list[GraphPass] = [RaiseOpset(target_opset), InsertDequantize(weights, external.read_array),
                              LowerTables(lowerings)]
    rewritten = run_passes(model, steps).model
    try:
        return Rewritten(run_passes(rewritten, [CheckModel()]).model, kernels, [])
    except RuntimeFailure as failure:
        if not isinstance(failure.__cause__, onnx.shape_inference.InferenceError):
            raise
    checked = run_passes(rewritten, [ReinferDeclaredShapes(), CheckModel()]).model
    note = ("the model's declared tensor shapes contradict shape inference (an exporter's mistake): the shapes "
            "inference can tell are now the inferred ones")
    log.info(note)
    return Rewritten(checked, kernels, [note])


def quantized_weight(q: QuantizedLayer, format: Format = Format.QDQ, accuracy_level: int = 0,
                     packed: bool = False) -> tuple[QuantizedWeight, KernelChoice]:
    """The graph pass's view of a layer (scales shaped as DequantizeLinear takes them, codes packed
    at their width with ``packed``), and the kernel that will run it."""
    float_dtype = q.codes.scheme.scale_dtype  # the layer's float type (FLOAT16 in a half-precision model)
    bias = None if q.bias is None else portable.bias_tensor(q.bias, float_dtype)
    activation = None if q.input_quantizer is None else portable.activation_quantization(q.input_quantizer)
    kernel_bias, other_bias = None, False  # what a fast kernel must add itself (Gemm's C)
    if q.layer.bias_in_node:
        if bias is not None:
            kernel_bias = dequantized(bias)
        elif q.layer.bias is not None:
            kernel_bias = q.layer.bias.astype(float_dtype)
        else:
            other_bias = True
    fast, kernel = choose_kernel(q, kernel_bias, other_bias, format, accuracy_level)
    weight = portable.weight_tensor(q.codes, packed and fast is None)  # a kernel stores the codes its own way
    if weight.packed_bits:
        kernel = replace(kernel, bits=weight.packed_bits)
    replaced_bias = bias is not None or (fast is not None and kernel_bias is not None)
    shift, float_bias = q.bias_shift, None
    if fast is not None and fast.conv is not None:  # QLinearConv adds the correction with its INT32 bias
        shift = None
    if (shift is not None and not replaced_bias and q.layer.bias is not None and q.layer.bias_name
            and activation is None):  # the correction folded into the float bias: no Add after the node
        shift, float_bias = None, (q.layer.bias + q.bias_shift).astype(float_dtype)
    if shift is not None:  # one value per output channel, broadcast over the axes after it
        shift = shift.reshape(-1, *[1] * q.layer.view.output_axes)
    return QuantizedWeight(q.layer.weight_name, weight, q.layer.form, q.layer.input_rank, shift,
                           q.layer.bias_name if replaced_bias or float_bias is not None else None, bias, activation,
                           fast, float_bias), kernel
