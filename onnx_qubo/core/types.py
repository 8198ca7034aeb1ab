"""Small data types passed between the stages of the pipeline (plain data, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

import numpy as np
import onnx

from . import external
from .grid import InputQuantizer, WeightCodes

if TYPE_CHECKING:
    from ..passes.insert_dequantize import GraphEdit, Lowered, QuantizedWeight
    from .views import ConvGeometry


class LayerForm(Protocol):
    """What the stages after discovery ask of the graph pattern a layer was found as (forms/: the
    full ``forms.base.DenseForm`` also finds it): its op type, and how to rewrite its node."""

    op_type: str

    def lower(self, node: onnx.NodeProto, weight: "QuantizedWeight", edit: "GraphEdit") -> "Lowered": ...


class WeightValues(Protocol):
    """A layer's weight as [n_out, f_in] float64: held in memory, or read from the model's
    external data each time it is asked for (a model over 2 GB holds one layer's at a time)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def read(self) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class InMemory:
    array: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        n, f = self.array.shape
        return n, f

    def read(self) -> np.ndarray:
        return self.array


@dataclass(frozen=True, eq=False)
class FromFile:
    """An initializer left in its external data file; ``canonical`` maps its stored layout to
    [n_out, f_in] float64."""

    tensor: onnx.TensorProto
    model: onnx.ModelProto
    canonical: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, int]

    def read(self) -> np.ndarray:
        return self.canonical(external.read_array(self.tensor, self.model))


@dataclass(frozen=True, eq=False)
class RowsOf:
    """Some rows of another layer's weight (one group of a grouped Conv)."""

    values: WeightValues
    rows: slice

    @property
    def shape(self) -> tuple[int, int]:
        return len(range(*self.rows.indices(self.values.shape[0]))), self.values.shape[1]

    def read(self) -> np.ndarray:
        return self.values.read()[self.rows]


class Accumulator(Protocol):
    """Running sums of one input view's vectors over the calibration batches (grams.py)."""

    def update(self, x: np.ndarray, seen: np.ndarray | None = None, samples: int = 1,
               mask: np.ndarray | None = None) -> None:
        """Add a batch's vectors ``x`` (``seen``: those the quantized layer will see instead) of
        ``samples`` samples; ``mask``: 0 at the positions to leave out, over ``x``'s leading axes
        (only for views whose vectors are positions, ``InputView.positions``)."""

    def statistics(self, group: int | None) -> InputStatistics: ...


class InputView(Protocol):
    """What a layer's input vectors are, as the form that found it builds them (forms/): the last
    axis of its input (``forms.base.LastAxis``), a Conv's im2col patches (``forms.conv.Patches``),
    a recurrent node's gate inputs ``[x_t; h_(t-1)]`` per direction (``forms.recurrent.GateInputs``).
    Calibration, memory planning and grouping ask it, never the layer's kind."""

    @property
    def tensors(self) -> tuple[str, ...]:
        """Tensors besides the layer's input that its vectors are built from (a cell's Y...)."""

    @property
    def positions(self) -> bool:
        """Its vectors are its input's positions (the last axis over the leading ones), so a
        padding mask over those leading axes says which to leave out (calibration/padding.py)."""

    @property
    def problems(self) -> int:
        """Separate layer problems it is solved as (groups.split_groups): a grouped Conv's
        groups, a recurrent node's directions; 1 otherwise."""

    @property
    def small_problems(self) -> bool:
        """Its problems are a grouped Conv's groups: a few neurons over a few weights each, often
        hundreds (layer.py solves them exactly when few weights are free)."""

    @property
    def output_axes(self) -> int:
        """Axes after the output channel: a per-channel vector added to the output is [n, 1...]."""

    @property
    def geometry(self) -> "ConvGeometry | None":
        """The Conv it is, for the kernels that run Convs (backends/kernels.py); None otherwise."""

    @property
    def output(self) -> str | None:
        """The output tensor whose range is calibrated when a kernel quantizes it (a Conv's:
        QLinearConv); None otherwise."""

    @property
    def unwritten(self) -> str | None:
        """An output of the layer's node that its vectors are built from but the node does not
        write (a recurrent node without Y), under the name calibration reads it by; None
        otherwise."""

    def source(self, input_name: str, owner: str) -> str:
        """The key its statistics are accumulated under: layers reading one tensor's last axis
        share it; a Conv's patches are its own (all groups share one pass), and so are a
        recurrent node's gate inputs (all its directions)."""

    def accumulator(self, features: int, drift: bool, owner: str, spread: bool = False) -> Accumulator:
        """Empty running sums for vectors ``features`` wide (``drift``: with the cross and drift
        sums; ``spread``: with the samples' spread); ``owner`` names the node in errors."""

    def vectors(self, x: np.ndarray, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """What the accumulator takes for a batch of the input ``x`` (``tensors``: the batch's
        other captured tensors, by name)."""


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """One dense layer found in the graph: ``y = gain * weight @ x (+ bias)``.

    ``weight`` is the float initializer in canonical [n_out, f_in] orientation, whatever
    layout the node stores it in; ``gain`` is Gemm's ``alpha`` (1 for MatMul). ``bias`` is the
    effective bias (Gemm's beta * C, or the constant of a following Add) when it is a
    per-output vector held by an initializer only this layer reads, so that it can be
    quantized (``bias_name``); otherwise None, and any bias stays as it is.
    """

    name: str  # the node's name (made unique by discovery when the model has none)
    form: LayerForm  # the pattern it was found as, which also rewrites it
    label: str  # the pattern in words, e.g. "Gemm(transB=1)", "MatMul+Add", "MatMul (N-D)"
    input_name: str  # activation tensor feeding the layer
    input_rank: int | None  # its rank when shape inference knows it
    weight_name: str  # initializer holding the weight
    values: WeightValues  # the weight, read by ``weight``
    gain: float
    bias: np.ndarray | None = None  # [n_out], float64
    bias_name: str | None = None
    bias_in_node: bool = False  # the node itself adds a bias (Gemm's C), not a following Add
    group: int | None = None  # one problem of a split layer (groups.py): its rows of ``parent``'s weight
    parent: str | None = None  # the node (grouped Conv, recurrent node) this problem belongs to
    view: InputView = field(kw_only=True)  # what its input vectors are, from the form that found it
    float_type: int = field(default=onnx.TensorProto.FLOAT, kw_only=True)  # the weight's type: FLOAT or FLOAT16

    @property
    def owner(self) -> str:
        """The node it is (or is one problem of)."""
        return self.parent or self.name

    @property
    def source_key(self) -> str:
        """The input view its statistics are accumulated from (``InputView.source``)."""
        return self.view.source(self.input_name, self.owner)

    @property
    def input_tensors(self) -> tuple[str, ...]:
        """The tensors its input vectors are built from (a recurrent node's also need Y...)."""
        return (self.input_name,) + self.view.tensors

    @property
    def statistics_key(self) -> str:
        """What its input statistics are stored under (a group's own Gram matrix for a group)."""
        return self.source_key if self.group is None else f"{self.source_key}[{self.group}]"

    @property
    def weight(self) -> np.ndarray:
        """[n_out, f_in], float64 (read from the external data file each time when it lives there:
        callers keep it only while they work on this layer)."""
        return self.values.read()

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    @property
    def op_type(self) -> str:
        return self.form.op_type


@dataclass(frozen=True, eq=False)
class InputStatistics:
    """Second moments of one dense-layer input (f features), bias column appended."""

    gram: np.ndarray  # [f+1, f+1] = E[z z^T], z = [x~; 1]
    count: int  # number of input vectors (rows after flattening leading axes)
    cross: np.ndarray | None = None  # [f+1, f] = E[z d^T], d = x - x~ (None: x~ = x)
    drift: np.ndarray | None = None  # [f, f] = E[d d^T]
    spread: float | None = None  # the sample Grams' spread (calibration/spread.py; None: not measured)

    @property
    def x_gram(self) -> np.ndarray:
        """E[x~ x~^T], the block that weights the rounding error while the bias stays float."""
        return self.gram[:-1, :-1]


@dataclass(frozen=True)
class SkippedNode:
    """A Gemm/MatMul that is not quantized, and why."""

    name: str
    op_type: str
    reason: str


@dataclass(frozen=True, eq=False)
class QuantizedBias:
    """A bias stored as integers: ``(integers - zero_point) * scale``."""

    integers: np.ndarray  # int64 [n_out]
    scale: np.ndarray  # () for one scale, or [n_out]
    zero_point: int | np.ndarray  # one, or [n_out] (the groups of a grouped Conv)
    storage: int  # ONNX integer type


@dataclass(frozen=True, eq=False)
class QuantizedLayer:
    """The result for one layer, ready for the graph rewrite: its weight codes [n_out, f_in]
    (``codes.dequantize()``, in the layer's stored units; Gemm's alpha still applies on top), and
    optionally a quantized bias, the quantization of its input, a float shift of its output, and
    the quantization of its output (a Conv that QLinearConv may run: format ort with quantized
    inputs)."""

    layer: DenseLayer
    codes: WeightCodes
    bias: QuantizedBias | None = None
    input_quantizer: InputQuantizer | None = None
    bias_shift: np.ndarray | None = None  # [n_out] added to the layer's output (bias correction)
    output_quantizer: InputQuantizer | None = None
