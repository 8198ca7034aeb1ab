"""Per-layer contribution to the model's output error: each layer quantized alone.

The layer objective is a layer's own output error; what users care about is the model's. A
layer whose error the rest of the network amplifies (a normalization or softmax after it, a
narrow bottleneck, the classifier) can dominate the model's error at a small QUBO cost. Here
every layer is solved once (``pipeline.solve_layers``, the same integers ``quantize`` writes),
then the float model with only that layer's integers put in is run in onnxruntime on held-out
data: one session per layer (a Conv's groups together), the cost of one evaluation each.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from ..core.grid import Granularity
from ..core.progress import Progress
from ..core.report import LayerReport
from ..core.types import QuantizedLayer
from ..evaluation.verify import Reference, run_scores
from ..graph.runtime import DEFAULT
from ..model.lowering import rewrite
from ..passes.packed_codes import STORAGE_BITS, packs
from ..pipeline import Calibrated, solve_all
from ..plan import Plan

FLOAT_BYTES = 4


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer at one scheme: the model's output error with only this layer quantized."""

    name: str
    form: str
    bits: int
    scheme: str  # e.g. "channel sym", "block 32 asym"
    output_error: float  # ||y - y_float|| / ||y_float|| on the reference data
    top1_agreement: float
    weight_bytes: int  # integers, scales and zero points as stored
    float_bytes: int  # the float weight it replaces
    cost: float  # the layer's QUBO cost (its own output error), for comparison


@dataclass(frozen=True, eq=False)
class Measured:
    """A scheme's layers, solved once, with each one's contribution measured."""

    layers: list[QuantizedLayer]  # merged (a grouped Conv as one)
    reports: list[LayerReport]
    sensitivities: list[LayerSensitivity]


def scheme_label(q: QuantizedLayer) -> str:
    scheme = q.codes.scheme
    groups = f"block {scheme.block_size}" if scheme.granularity == Granularity.BLOCK else str(scheme.granularity)
    return f"{groups} {'sym' if scheme.symmetric else 'asym float' if scheme.float_zero_point else 'asym'}"


def stored_bytes(q: QuantizedLayer, packed: bool) -> int:
    """Bytes of a quantized weight as written: packed integers (at their own width with ``packed``,
    where their type is wider: passes/packed_codes.py), float scales, packed zero points (float
    ones as the scales), and the float output shift of bias correction where the layer has no
    bias to fold it into."""
    codes = q.codes
    storage, count = codes.scheme.grid.storage[0], codes.integers.size
    width = STORAGE_BITS[storage]  # the zero points' always
    if packed and packs(codes.bits, storage, count):  # planes of whole bytes: the codes padded to 8
        integers = -(-count // 8) * codes.bits
    else:
        integers = -(-count * width // 8)
    zero_points = 0 if codes.signed or codes.scheme.float_zero_point else -(-codes.scales.zero_point.size * width // 8)
    floats = codes.scales.scale.size * (1 + codes.scheme.float_zero_point)
    shift = 0 if q.bias_shift is None or q.layer.bias is not None else q.bias_shift.size * FLOAT_BYTES
    return integers + zero_points + floats * FLOAT_BYTES + shift


def measure(calibrated: Calibrated, plan: Plan, reference: Reference, progress: Progress) -> Measured:
    """Solve ``plan`` and measure each layer's contribution alone on ``reference``'s data."""
    layers, reports = solve_all(calibrated, plan, progress)
    return Measured(layers, reports, [alone(calibrated, q, report, reference, progress, plan.pack_codes)
                                      for q, report in zip(layers, reports)])


def alone(calibrated: Calibrated, q: QuantizedLayer, report: LayerReport, reference: Reference,
          progress: Progress, packed: bool) -> LayerSensitivity:
    """The model's output error with only ``q`` quantized (its bytes as written, ``packed`` as
    for stored_bytes)."""
    model = rewrite(calibrated.model, [q]).model
    y = reference.of(run_scores(model, DEFAULT, reference.dataset, reference.output, progress,
                                f"model with only '{q.layer.name}'"))
    y_float = reference.scores
    error = float(np.linalg.norm(y - y_float) / max(float(np.linalg.norm(y_float)), 1e-30))
    agreement = float((y.argmax(axis=-1) == y_float.argmax(axis=-1)).mean())
    return LayerSensitivity(q.layer.name, q.layer.label, q.codes.bits, scheme_label(q), error, agreement,
                            stored_bytes(q, packed), q.codes.integers.size * FLOAT_BYTES, report.final_cost)


def to_markdown(sensitivities: list[LayerSensitivity]) -> str:
    """The table, largest contribution first."""
    rows = ["| layer | form | bits | scheme | output error alone | top-1 agreement | QUBO cost | bytes (float) |",
            "|---|---|---|---|---|---|---|---|"]
    for s in sorted(sensitivities, key=lambda s: -s.output_error):
        rows.append(f"| {s.name} | {s.form} | {s.bits} | {s.scheme} | {s.output_error:.4g} | {s.top1_agreement:.2%} "
                    f"| {s.cost:.4g} | {s.weight_bytes:,} ({s.float_bytes:,}) |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Sensitivity:
    """``onnx-qubo sensitivity``'s result: every layer's contribution, with what was measured."""

    model: str
    bits: int
    scheme: str
    data: str
    samples: int
    layers: list[LayerSensitivity]
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_markdown(self) -> str:
        total = float(np.sqrt(sum(s.output_error ** 2 for s in self.layers)))
        return "\n".join([
            f"Model `{self.model}`, {self.bits} bits, {self.scheme}: the model's relative output error with only "
            f"one layer quantized, on {self.samples} samples ({self.data}); largest first. "
            f"Sum in squares {total:.3g} (the estimate of all layers together); {self.seconds:.1f} s.", "",
            to_markdown(self.layers)])
