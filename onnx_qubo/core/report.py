"""What a quantization run reports, rendered as text for people and as JSON for pipelines."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .types import SkippedNode


@dataclass(frozen=True)
class LayerReport:
    """Per layer: QUBO cost (mean squared pre-activation error, summed over outputs)."""

    name: str
    form: str
    n_out: int
    f_in: int
    bits: int
    storage: str  # ONNX integer type, e.g. "INT2"
    free_fraction: float  # share of weights with a real down/up choice
    cost_rtn: float  # round-to-nearest on the same scales
    cost_solved: float
    lower_bound: float | None  # certified: no rounding on these scales costs less (None: not computed)
    solve_seconds: float
    cost_bias_corrected: float | None = None  # cost_solved less the mean error the new bias removes
    cost_rtn_bias_corrected: float | None = None  # cost_rtn less the mean error its own correction would remove
    bias: str = "float"  # how the layer's bias is stored: float, the weights' type, or INT32
    kernel: str = "DequantizeLinear"  # what runs it: DequantizeLinear (portable), MatMulNBits...
    kernel_fallback: str | None = None  # format ort: why the layer kept the portable form
    kernel_bits: int | None = None  # bits per code in the kernel's weights (MatMulNBits: 2, 4 or 8; packed: theirs)
    damping: float = 0.0  # its objective's ridge, a share of the mean diagonal (--damping; a Conv: its groups' most)
    vectors: int = 0  # calibration input vectors its Gram matrix sums (tokens, samples, a Conv's patches; 0: none)

    @property
    def final_cost(self) -> float:
        """The layer's output error as written: after the bias correction where there is one."""
        return self.cost_solved if self.cost_bias_corrected is None else self.cost_bias_corrected

    @property
    def final_cost_rtn(self) -> float:
        """Round to nearest's output error as this layer would write it (after its own bias correction
        where this layer has one): what the rounding solved for is compared with."""
        return self.cost_rtn if self.cost_rtn_bias_corrected is None else self.cost_rtn_bias_corrected

    @property
    def stored_bits(self) -> int:
        """Bits each code takes in the written file: its integer type's, or those of the kernel's
        weights where a kernel packs them its own way (MatMulNBits: 2, 4 or 8), or its own width
        where DequantizeLinear's codes are packed at it (--pack-codes)."""
        if self.kernel_bits is not None:
            return self.kernel_bits
        return int("".join(c for c in self.storage if c.isdigit()))

    @property
    def gap(self) -> float | None:
        """The most by which the cost solved for can exceed the optimum, as a share of it (with bias
        correction the layer is solved for the error the correction leaves, and bounded on it)."""
        if self.lower_bound is None:
            return None
        cost = self.final_cost
        return 1.0 - self.lower_bound / cost if cost > 0 else 0.0


@dataclass(frozen=True)
class Evaluation:
    """Float vs quantized model in onnxruntime (default session options) on evaluation data."""

    data: str
    output: str  # the model output compared (argmax over its last axis)
    samples: int
    float_accuracy: float | None  # None when the data has no labels
    quantized_accuracy: float | None
    top1_agreement: float  # share of samples whose argmax matches the float model's
    relative_output_error: float  # ||y_q - y_f|| / ||y_f|| over the first output
    default_matches_basic: bool  # same predictions at ORT's default and basic optimization
    default_vs_basic_max_diff: float
    mean_cosine: float  # mean over rows of cos(y_float, y_quant): the measure for embeddings
    max_abs_error: float  # largest |y_quant - y_float|
    decision_flips: float | None  # one score per row: share of rows whose side of 0.5 changes
    default_vs_unoptimized: float  # ||y_default - y_ref|| / ||y_ref||, y_ref: the DequantizeLinear
    # model of the same codes with graph optimizations disabled
    basic_vs_unoptimized: float  # the same at the basic level (0 when levels are not checked)
    float_perplexity: float | None = None  # language models (perplexity.py): next-token perplexity
    quantized_perplexity: float | None = None
    predictions: int = 0  # the next tokens scored (a window of T tokens scores T - 1)
    level_samples: int | None = None  # the samples the level checks ran on (None: all of them)
    positions: tuple[int, int] | None = None  # per-position scores: (kept, all) positions, padded ones left out
    argmax_rows: int = 0  # the argmaxes top-1 agreement compares (more than the samples: an output of rank > 2)
    argmax_width: int = 0  # the width of the axis they are taken over (the output's last)


@dataclass(frozen=True)
class Speed:
    """Median latency (ms) of the float and the quantized model at onnxruntime's default level."""

    batch_size: int  # the evaluation batch
    float_single: float
    float_batch: float
    quantized_single: float
    quantized_batch: float
    single_size: int = 1  # the small batch: 1, or the model's fixed batch size
    lean: bool = False  # big model: timed one after the other, without onnxruntime's memory arena


@dataclass(frozen=True)
class Report:
    """A run: what ``quantize`` did; ``evaluate``, ``measure_speed`` and ``save`` (api.py) fill in
    ``evaluation``, ``speed`` and the output (None until then)."""

    input_path: str | None
    output_path: str | None
    bits: int
    scale: str
    solver: str
    calibration: str
    calibration_samples: int
    layers: list[LayerReport]
    skipped: list[SkippedNode]
    evaluation: Evaluation | None
    input_bytes: int
    output_bytes: int | None
    seconds: float
    scheme: str = ""  # granularity, zero points, bias, activations in words
    notes: list[str] = field(default_factory=list)
    speed: Speed | None = None  # None when not measured

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        wide = max([28] + [len(layer.name) + 2 for layer in self.layers])  # e.g. If/then_branch/... names
        lines = [
            f"{self.input_path or 'model'} -> {self.output_path or 'model (not saved)'}",
            f"bits={self.bits} scale={self.scale} solver={self.solver}, calibrated on "
            f"{self.calibration_samples} samples ({self.calibration})",
            *([self.scheme] if self.scheme else []),
            "",
            f"{'layer':<{wide}}{'form':<22}{'shape':>12}{'bits':>5}{'type':>6}{'bias':>6}{'free':>7}"
            f"{'cost rtn':>12}{'cost ' + self.solver:>12}{'ratio':>7}{'bound':>11}{'gap':>6}{'time':>8}",
        ]
        for layer in self.layers:
            ratio = layer.final_cost / layer.final_cost_rtn if layer.final_cost_rtn > 0 else 1.0
            lines.append(
                f"{layer.name:<{wide}}{layer.form:<22}{f'{layer.n_out}x{layer.f_in}':>12}{layer.bits:>5}{layer.storage:>6}{layer.bias:>6}"
                f"{layer.free_fraction:>7.0%}{layer.final_cost_rtn:>12.4g}{layer.final_cost:>12.4g}"
                f"{ratio:>7.3f}{_or_dash(layer.lower_bound, '.4g'):>11}{_or_dash(layer.gap, '.0%'):>6}"
                f"{layer.solve_seconds:>7.1f}s")
        if any(layer.kernel != "DequantizeLinear" or layer.kernel_fallback for layer in self.layers):
            lines.append("kernels: " + ", ".join(f"{layer.name} {layer.kernel}" for layer in self.layers))
            lines += [f"layer '{layer.name}' keeps DequantizeLinear: {layer.kernel_fallback}"
                      for layer in self.layers if layer.kernel_fallback]
        if any(layer.cost_bias_corrected is not None for layer in self.layers):
            lines.append(f"bias correction (the costs above are what it leaves): total cost "
                         f"{sum(layer.cost_solved for layer in self.layers):.4g} -> "
                         f"{sum(layer.final_cost for layer in self.layers):.4g}")
        for node in self.skipped:
            lines.append(f"skipped {node.op_type} '{node.name}': {node.reason}")
        if self.evaluation is not None:
            lines += ["", *_evaluation_lines(self.evaluation)]
        if self.speed is not None:
            s = self.speed
            how = "default level" + (", one model after the other, no memory arena" if s.lean else "")
            lines.append(f"latency (ms, {how}): batch {s.single_size} float {s.float_single:.3g}, quantized "
                         f"{s.quantized_single:.3g} ({s.quantized_single / s.float_single:.2f}x); batch "
                         f"{s.batch_size} float {s.float_batch:.3g}, quantized {s.quantized_batch:.3g} "
                         f"({s.quantized_batch / s.float_batch:.2f}x)")
        if self.output_bytes is not None:
            lines.append(f"size: {self.input_bytes:,} -> {self.output_bytes:,} bytes "
                         f"({self.output_bytes / self.input_bytes:.1%}); {self.seconds:.1f} s in all")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _evaluation_lines(ev: Evaluation) -> list[str]:
    """The evaluation in words."""
    lines: list[str] = []
    if ev.float_accuracy is not None and ev.quantized_accuracy is not None:
        lines.append(f"accuracy on {ev.samples} samples ({ev.data}, output '{ev.output}'): "
                     f"float {ev.float_accuracy:.2%}, quantized {ev.quantized_accuracy:.2%} "
                     f"({(ev.quantized_accuracy - ev.float_accuracy) * 100:+.2f} points)")
    if ev.float_perplexity is not None and ev.quantized_perplexity is not None:
        increase = ev.quantized_perplexity - ev.float_perplexity
        lines.append(f"perplexity on {ev.predictions:,} next tokens of {ev.samples} windows ({ev.data}, output "
                     f"'{ev.output}'): float {ev.float_perplexity:.4g}, quantized {ev.quantized_perplexity:.4g} "
                     f"({increase:+.4g}, {increase / ev.float_perplexity:+.2%})")
        lines.append(f"per token: top-1 agreement with float {ev.top1_agreement:.2%}; relative output error "
                     f"{ev.relative_output_error:.3g}; mean cosine {ev.mean_cosine:.4f}")
    elif ev.decision_flips is None:
        over = "" if ev.argmax_rows <= ev.samples else \
            f" (argmax over the last axis, {ev.argmax_width:,} wide, in each of {ev.argmax_rows:,} rows)"
        lines.append(f"top-1 agreement with float{over}: {ev.top1_agreement:.2%}; relative output error "
                     f"{ev.relative_output_error:.3g}; mean cosine {ev.mean_cosine:.4f}")
    else:  # one score per row: top-1 agreement is always 100%
        lines.append(f"one score per row: decisions at 0.5 flipped on {ev.decision_flips:.2%} of rows; largest "
                     f"change {ev.max_abs_error:.3g}; relative output error {ev.relative_output_error:.3g}")
    if ev.positions is not None:
        lines.append(f"measured on the {ev.positions[0]:,} of {ev.positions[1]:,} positions the padding mask keeps "
                     "(the padded ones never reach a masked model's use of its output)")
    check = "same predictions" if ev.default_matches_basic else "DIFFERENT predictions"
    lines.append(f"onnxruntime default vs basic optimization: {check} "
                 f"(max |diff| {ev.default_vs_basic_max_diff:.3g})")
    lines.append(f"against the DequantizeLinear model with optimizations disabled (no graph rewrites, no fused "
                 f"kernels): default level {ev.default_vs_unoptimized:.2g}, basic level "
                 f"{ev.basic_vs_unoptimized:.2g} (relative output difference"
                 f"{'' if ev.level_samples is None else f' on the first {ev.level_samples} windows'})")
    return lines


def _or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
