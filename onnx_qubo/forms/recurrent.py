"""``LSTM`` and ``RNN`` with constant ``W [D, G*H, I]`` and ``R [D, G*H, H]``: each gate row is a
dense neuron over the gate input ``z_t = [x_t; h_(t-1)]``.

Direction ``d``'s gate pre-activations at step t are ``W[d] x_t + R[d] h_(t-1) + Wb[d] + Rb[d]``
(G gates: LSTM 4, RNN 1), so its weight as [n_out, f_in] is ``[W[d] | R[d]]``, [G*H, I+H], and
the rounding QUBO of qubo.py applies unchanged with ``G_d = E[z z^T]``, the mean over every step
each sample runs (``sequence_lens``) of every sample: the QUBO energy is the gate pre-activation
error summed over gates, averaged over steps, with ``h_(t-1)`` the float model's hidden state
(read from the node's output Y, shifted by one step in the direction's time order, ``initial_h``
or zeros first). Activations, clip, peepholes and ``input_forget`` act after the pre-activation:
they change h (read, not recomputed) but not the objective. Each direction has its own hidden
states, hence its own Gram matrix: one layer problem per direction (groups.split_groups, like a
grouped Conv's groups), merged again into one [D*G*H, I+H] matrix for the rewrite. W and R rows
are one neuron: one scale per row over both (blocks run along I+H and may span the W|R
boundary). The bias B stays float; bias correction is added to B's W half.

Lowered to one ``DequantizeLinear`` of the [D*G*H, I+H] integers -> ``Slice`` columns ``:I`` and
``I:`` -> ``Reshape`` to W's and R's shapes -> the same node: exact at every onnxruntime level
(tests/test_recurrent.py). ``GRU`` is found and skipped: its candidate gate reads ``r_t * h_(t-1)``
(or scales R's error by ``r_t``), another input per gate row than ``z_t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import helper

from ..calibration.grams import RecurrentGram
from ..core.types import Accumulator, DenseLayer, InMemory
from ..core.views import RecurrentCell
from ..passes.insert_dequantize import GraphEdit, Lowered, QuantizedWeight
from .base import GraphIndex, Skip, attributes

GATES = {"LSTM": 4, "RNN": 1}
DIRECTIONS = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}
SEQUENCE_LENS, INITIAL_H = 4, 5  # input positions, the same for LSTM, GRU and RNN


@dataclass(frozen=True)
class GateInputs:
    """A recurrent node's input view (``types.InputView``): its gate inputs ``[x_t; h_(t-1)]``,
    built from X and Y (``RecurrentCell.gate_inputs``), one layer problem per direction."""

    cell: RecurrentCell
    positions = False  # time steps, not positions a mask over the input's leading axes marks
    small_problems = False
    output_axes = 0
    geometry = None
    output = None

    @property
    def unwritten(self) -> str | None:
        """The node's Y, under the name calibration reads it by, when the node writes no Y."""
        return None if self.cell.named else self.cell.output

    @property
    def tensors(self) -> tuple[str, ...]:
        return self.cell.tensors

    @property
    def problems(self) -> int:
        return self.cell.directions

    def source(self, input_name: str, owner: str) -> str:
        return f"{input_name}#gates:{owner}"

    def accumulator(self, features: int, drift: bool, owner: str, spread: bool = False) -> Accumulator:
        return RecurrentGram(features, self.cell.directions, drift, spread)

    def vectors(self, x: np.ndarray, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.cell.gate_inputs(x, tensors)


class RecurrentForm:

    def __init__(self, op_type: str):
        self.op_type = op_type

    def match(self, node: onnx.NodeProto, name: str, index: GraphIndex) -> DenseLayer | Skip:
        if self.op_type not in GATES:
            return Skip(f"{self.op_type} recurrent cell: its candidate gate reads r_t * h_(t-1) (or scales R's "
                        "error by r_t), another input than [x_t; h_(t-1)]; not quantized yet")
        attrs = attributes(node)
        direction = attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else str(direction)
        if direction not in DIRECTIONS:
            return Skip(f"direction '{direction}' is not one of {', '.join(DIRECTIONS)}")
        activation = node.input[0]
        weights = []
        for position in (1, 2):
            init = index.constant_weight(activation, node.input[position], rank=None)
            if isinstance(init, Skip):
                return init
            weights.append(index.array(init).astype(np.float64))
        w, r = weights
        d, rows = len(DIRECTIONS[direction]), GATES[self.op_type] * r.shape[-1] if r.ndim == 3 else 0
        if w.ndim != 3 or r.ndim != 3 or w.shape[:2] != (d, rows) or r.shape != (d, rows, r.shape[-1]):
            return Skip(f"W {list(w.shape)} and R {list(r.shape)} are not [{d}, {GATES[self.op_type]}*H, I] and "
                        f"[{d}, {GATES[self.op_type]}*H, H] ({direction})")
        hidden = r.shape[-1]
        if attrs.get("hidden_size", hidden) != hidden:
            return Skip(f"hidden_size={attrs['hidden_size']} differs from R's {hidden}")
        extra = {}
        for position in (SEQUENCE_LENS, INITIAL_H):
            tensor = node.input[position] if len(node.input) > position else ""
            if tensor in index.overridable:
                return Skip(f"'{tensor}' is an initializer callers can override")
            constant = index.initializers.get(tensor)
            extra[position] = index.array(constant) if constant is not None else tensor or None
        named = bool(node.output) and bool(node.output[0])
        cell = RecurrentCell(self.op_type, DIRECTIONS[direction], w.shape[2], hidden, int(attrs.get("layout", 0)),
                             node.output[0] if named else f"{name}/Y (calibration)", named, extra[INITIAL_H],
                             extra[SEQUENCE_LENS])
        weight = np.hstack([w.reshape(d * rows, -1), r.reshape(d * rows, hidden)])
        return DenseLayer(name, self, f"{self.op_type} {direction}", activation, index.ranks.get(activation),
                          node.input[1], InMemory(weight), 1.0, view=GateInputs(cell))

    def lower(self, node: onnx.NodeProto, weight: QuantizedWeight, edit: GraphEdit) -> Lowered:
        nodes, deq = edit.dequantize(weight.name, weight.weight)
        dims = {init.name: list(init.dims) for init in edit.graph.initializer if init.name in node.input[1:3]}
        w_dims, r_dims = dims[node.input[1]], dims[node.input[2]]
        split = w_dims[2]
        cell = onnx.NodeProto()
        cell.CopyFrom(node)
        for position, (start, end), shape in ((1, (0, split), w_dims), (2, (split, split + r_dims[2]), r_dims)):
            base = node.input[position]
            starts, ends, axes, target = (edit.constant(f"{base}_{what}", np.array(v, np.int64)) for what, v in
                                          (("starts", [start]), ("ends", [end]), ("axes", [1]), ("shape", shape)))
            columns, reshaped = edit.fresh(f"{base}_columns"), edit.fresh(f"{base}_dequantized")
            nodes += [helper.make_node("Slice", [deq, starts, ends, axes], [columns], name=edit.fresh(f"{base}_Slice")),
                      helper.make_node("Reshape", [columns, target], [reshaped], name=edit.fresh(f"{base}_Reshape"))]
            cell.input[position] = reshaped
        if weight.output_shift is not None:  # bias correction: added to B's W half, per gate row
            d, rows = w_dims[0], w_dims[1]
            shift = np.zeros((d, 2 * rows), np.float32)
            shift[:, :rows] = weight.output_shift.reshape(d, rows)
            while len(cell.input) < 4:
                cell.input.append("")
            bias = cell.input[3]
            cell.input[3] = edit.constant(f"{weight.name}_bias_correction", shift)
            if bias:
                corrected = edit.fresh(f"{bias}_corrected")
                nodes.append(helper.make_node("Add", [bias, cell.input[3]], [corrected],
                                              name=edit.fresh(f"{bias}_bias_correction")))
                cell.input[3] = corrected
        qdq, cell.input[0] = edit.quantize_activation(node.input[0], weight.activation)
        return Lowered(nodes + qdq + [cell], dropped={node.input[2]}, shift_folded=True)
