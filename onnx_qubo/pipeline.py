"""The data flow of DESIGN.md section 3, one stage per line.

    model --calibrate (find_dense_layers, input_quantizers, collect_statistics)--> layers + statistics
          --solve_layers (choose_scales, build_problem, solver.solve)--> integer weights
          --rewrite (raise opset, insert DequantizeLinear, check)--> quantized model

With ``sequential``, each layer's statistics are gathered again from the model whose earlier
layers are already quantized (their inputs as deployed), against the float model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Collection, Iterator, Mapping

import numpy as np
import onnx

from . import discovery, exchange
from .activations import ACTIVATION_TYPES, RANGE_METHODS, input_quantizers
from .bounds import lower_bounds
from .calibration import InputStatistics, collect_statistics
from .data import Dataset
from .errors import QuboInputError
from .grid import GroupScales, InputQuantizer, Scheme
from .passes import (ActivationQuantization, CheckModel, InsertDequantize, QuantizedTensor, QuantizedWeight,
                     RaiseOpset, run_passes)
from .progress import Progress
from .qubo import LayerProblem, build_problem
from .report import LayerReport
from .scales import QUBO_CANDIDATES, candidate_scales, choose_scales, tensor_scales
from .solvers import FastSolver, RoundToNearest, Solver
from .types import DenseLayer, QuantizedBias, QuantizedLayer, SkippedNode

BIAS_MODES = ("float", "quantize", "int32")
INT32_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class QuantizeOptions:
    bits: int = 2
    scale: str = "mse"
    solver: Solver = field(default_factory=RoundToNearest)
    seed: int = 0
    dump_dir: Path | None = None  # write each layer's QUBOs here (exchange.py's format)
    solution_dir: Path | None = None  # take the roundings from here instead of solving
    layer_bits: Mapping[str, int] = field(default_factory=dict)  # layer name -> bits, overriding ``bits``
    bias_correction: bool = False  # shift each output by the mean error the rounding leaves
    lower_bound: bool = True  # certify a lower bound per layer (compare has no use for it)
    granularity: str = "channel"  # weights sharing a scale: channel | tensor | block
    block_size: int = 0
    symmetric: bool = True  # signed grid, zero point 0; else unsigned grid with zero points
    bias: str = "float"  # float | quantize (a QUBO variable, same bits) | int32 (needs activations)
    activations: str = "none"  # none | int8 | uint8
    activation_range: str = "minmax"  # minmax | percentile
    sequential: bool = False  # calibrate each layer on the outputs of the quantized earlier ones

    def bits_for(self, layer: DenseLayer) -> int:
        return self.layer_bits.get(layer.name, self.bits)

    def scheme_for(self, layer: DenseLayer) -> Scheme:
        return Scheme(self.bits_for(layer), self.granularity, self.block_size, self.symmetric)

    def describe(self) -> str:
        """The scheme in words, for reports."""
        zero_point = "symmetric" if self.symmetric else "asymmetric (zero points)"
        groups = f"blocks of {self.block_size} inputs" if self.granularity == "block" else f"per {self.granularity}"
        text = f"weights {groups}, {zero_point}; bias {self.bias}; activations {self.activations}"
        if self.activations != "none":
            text += f" ({self.activation_range} ranges)"
        return text + ("; sequential calibration" if self.sequential else "")

    def check(self) -> None:
        """Refuse combinations that cannot be built, naming the flags."""
        if self.activations not in ACTIVATION_TYPES:
            raise QuboInputError(f"--activations must be one of {', '.join(ACTIVATION_TYPES)}, "
                                 f"got '{self.activations}'")
        if self.activation_range not in RANGE_METHODS:
            raise QuboInputError(f"--activation-range must be one of {', '.join(RANGE_METHODS)}, "
                                 f"got '{self.activation_range}'")
        if self.bias not in BIAS_MODES:
            raise QuboInputError(f"--bias must be one of {', '.join(BIAS_MODES)}, got '{self.bias}'")
        if self.bias == "int32" and self.activations == "none":
            raise QuboInputError("--bias int32 needs quantized inputs (--activations int8 or uint8): "
                                 "its scale is the input scale times the weight scale")
        if self.bias == "quantize" and self.bias_correction:
            raise QuboInputError("--bias-correction re-fits a float bias; with --bias quantize the bias "
                                 "is already a variable of each neuron's QUBO")
        two_bit = min([self.bits, *self.layer_bits.values()]) <= 2
        if two_bit and not self.symmetric and self.activations != "none" and self.granularity != "block":
            raise QuboInputError(
                "--asymmetric 1-2 bit weights per channel or tensor with --activations: onnxruntime 1.32 fuses "
                "them into QGemm, which rejects UINT2, and cannot load the model; use --symmetric, "
                "--granularity block, or more bits")
        try:
            Scheme(self.bits, self.granularity, self.block_size, self.symmetric)
        except ValueError as exc:
            raise QuboInputError(f"--granularity/--block-size: {exc}") from None


@dataclass(frozen=True, eq=False)
class Calibrated:
    """A float model's dense layers and the statistics of their inputs: gathered once,
    reusable for any number of quantization settings (``onnx-qubo compare``)."""

    model: onnx.ModelProto
    dataset: Dataset
    layers: list[DenseLayer]
    skipped: list[SkippedNode]
    statistics: dict[str, InputStatistics]  # layer input tensor -> statistics
    quantizers: dict[str, InputQuantizer]  # layer input tensor -> its quantizer (quantized inputs only)


@dataclass(frozen=True, eq=False)
class SolvedLayer:
    """One layer's scales, QUBO, chosen rounding and report."""

    layer: DenseLayer
    scheme: Scheme
    scales: GroupScales
    problem: LayerProblem
    choice: np.ndarray
    report: LayerReport
    bias_scales: GroupScales | None = None  # the bias is the last variable of each neuron's QUBO
    bias: QuantizedBias | None = None  # or a fixed integer bias (INT32)
    input_quantizer: InputQuantizer | None = None
    bias_shift: np.ndarray | None = None

    def quantized(self, choice: np.ndarray | None = None) -> QuantizedLayer:
        """The integer weights of this rounding (or of another ``choice`` on the same problem,
        then without bias correction)."""
        integers = self.problem.integers(self.choice if choice is None else choice)
        f = self.layer.shape[1]
        bias = self.bias
        if self.bias_scales is not None:
            bias = QuantizedBias(integers[:, f], np.asarray(self.bias_scales.scale[0, 0]),
                                 int(self.bias_scales.zero_point[0, 0]), self.scheme.grid.storage[0])
        return QuantizedLayer(self.layer, self.scheme, integers[:, :f], self.scales, bias, self.input_quantizer,
                              self.bias_shift if choice is None else None)


def quantize_model(model: onnx.ModelProto, calibration: Dataset, options: QuantizeOptions,
                   progress: Progress, exclude: Collection[str] = ()
                   ) -> tuple[onnx.ModelProto, list[LayerReport], list[SkippedNode]]:
    """Quantize every dense layer of ``model`` but the ``exclude``d ones; return the new model
    and what was done."""
    options.check()
    calibrated = calibrate(model, calibration, progress, exclude, options.activations, options.activation_range)
    unknown = set(options.layer_bits) - {layer.name for layer in calibrated.layers}
    if unknown:
        raise QuboInputError(f"--layer-bits names no quantized dense layer: {', '.join(sorted(unknown))} "
                             "(onnx-qubo inspect lists the layers)")
    quantized, reports = [], []
    for solved in solve_layers(calibrated, options, progress):
        quantized.append(solved.quantized())
        reports.append(solved.report)
    return rewrite(model, quantized), reports, calibrated.skipped


def calibrate(model: onnx.ModelProto, calibration: Dataset, progress: Progress, exclude: Collection[str] = (),
              activations: str = "none", activation_range: str = "minmax") -> Calibrated:
    layers, skipped = find_layers(model, exclude)
    quantizers = input_quantizers(model, layers, calibration, activations, activation_range, progress)
    statistics = collect_statistics(model, layers, calibration, progress, quantizers=quantizers)
    return Calibrated(model, calibration, layers, skipped, statistics, quantizers)


def solve_layers(calibrated: Calibrated, options: QuantizeOptions, progress: Progress) -> Iterator[SolvedLayer]:
    """Solve the layers one at a time, in graph order (a caller that keeps only the integers
    frees each QUBO)."""
    layers = calibrated.layers
    stems = exchange.file_stems([layer.name for layer in layers])
    deployed = None  # with ``sequential``: the model with the layers solved so far quantized
    for k, (layer, stem) in enumerate(zip(layers, stems)):
        statistics = calibrated.statistics[layer.input_name]
        if deployed is not None:
            statistics = collect_statistics(calibrated.model, [layer], calibrated.dataset, progress, deployed,
                                            calibrated.quantizers)[layer.input_name]
        solved = solve_layer(layer, stem, statistics, calibrated.quantizers.get(layer.input_name), options, progress)
        if options.sequential and k + 1 < len(layers):
            deployed = rewrite(calibrated.model if deployed is None else deployed, [solved.quantized()])
        yield solved
    if options.dump_dir is not None:
        exchange.write_index(options.dump_dir, [
            {"layer": layer.name, "file": f"{stem}.qubo.npz", "n_out": layer.shape[0], "f_in": layer.shape[1],
             "variables": layer.shape[1] + _bias_is_variable(layer, options), "bits": options.bits_for(layer)}
            for layer, stem in zip(layers, stems)])


def find_layers(model: onnx.ModelProto, exclude: Collection[str] = ()
                ) -> tuple[list[DenseLayer], list[SkippedNode]]:
    """Dense layers to quantize (with finite weights, not excluded by name), or an error
    saying why there are none."""
    layers, skipped = discovery.find_dense_layers(model)
    unknown = set(exclude) - {layer.name for layer in layers}
    if unknown:
        raise QuboInputError(f"--exclude names no dense layer: {', '.join(sorted(unknown))} "
                             "(onnx-qubo inspect lists the layers)")
    skipped += [SkippedNode(layer.name, layer.op_type, "excluded by --exclude")
                for layer in layers if layer.name in exclude]
    layers = [layer for layer in layers if layer.name not in exclude]
    if not layers:
        why = "; ".join(f"{s.name}: {s.reason}" for s in skipped) or "the graph has no Gemm or MatMul node"
        raise QuboInputError(f"no quantizable dense layers found ({why})")
    for layer in layers:
        if not np.isfinite(layer.weight).all():
            raise QuboInputError(f"weight '{layer.weight_name}' of layer '{layer.name}' holds NaN or Inf")
    return layers, skipped


def _bias_is_variable(layer: DenseLayer, options: QuantizeOptions) -> bool:
    return options.bias == "quantize" and layer.bias is not None


@dataclass(frozen=True, eq=False)
class _LayerTerms:
    """What the QUBO of a layer needs besides its scales (qubo.py): Gram, cross, offset."""

    layer: DenseLayer
    statistics: InputStatistics
    with_bias: bool

    @property
    def gram(self) -> np.ndarray:
        return self.statistics.gram if self.with_bias else self.statistics.x_gram

    @cached_property  # computed once however many scale candidates are tried
    def cross(self) -> np.ndarray | None:
        """[n, m] in output units: alpha * E[z d^T] w_i (None when the inputs are the float ones)."""
        if self.statistics.cross is None:
            return None
        m = len(self.gram)
        return self.layer.gain * self.layer.weight @ self.statistics.cross[:m].T

    @cached_property
    def weight_cross(self) -> np.ndarray | None:
        """The same for the weight columns, in weight units (for the scale search)."""
        f = self.layer.shape[1]
        return None if self.statistics.cross is None else self.layer.weight @ self.statistics.cross[:f].T

    @cached_property
    def offset(self) -> np.ndarray | None:
        if self.statistics.drift is None:
            return None
        w = self.layer.weight
        return self.layer.gain ** 2 * np.einsum("if,if->i", w @ self.statistics.drift, w)

    def problem(self, scheme: Scheme, scales: GroupScales, bias_scales: GroupScales | None) -> LayerProblem:
        n, f = self.layer.shape
        scale = scales.per_column(scales.scale, f)
        zero_point = scales.per_column(scales.zero_point, f)
        values, gain = self.layer.weight, self.layer.gain
        if self.with_bias:
            values = np.hstack([values, self.layer.bias[:, None]])
            scale = np.hstack([np.broadcast_to(scale, (n, f)), bias_scales.scale])
            zero_point = np.hstack([np.broadcast_to(zero_point, (n, f)), bias_scales.zero_point])
            gain = np.r_[np.full(f, self.layer.gain), 1.0]
        return build_problem(values, scale, zero_point, gain, scheme.grid, self.gram, self.cross, self.offset)

    def mean_error(self, problem: LayerProblem, choice: np.ndarray) -> np.ndarray:
        """E[y - y_q] per output: cancelled by adding it to the output (bias correction)."""
        shift = problem.errors(choice) @ self.statistics.gram[-1, :problem.shape[1]]  # E[z~]
        if self.statistics.cross is not None:
            shift = shift + self.layer.gain * self.layer.weight @ self.statistics.cross[-1]
        return shift


def solve_layer(layer: DenseLayer, stem: str, statistics: InputStatistics, quantizer: InputQuantizer | None,
                options: QuantizeOptions, progress: Progress) -> SolvedLayer:
    """Scales, QUBO, rounding and report for one layer (``stem`` names its exchange files)."""
    scheme = options.scheme_for(layer)
    grid = scheme.grid
    terms = _LayerTerms(layer, statistics, _bias_is_variable(layer, options))
    bias_scales = tensor_scales(layer.bias, grid) if terms.with_bias else None
    solved, search_seconds = None, 0.0  # the fast solver's rounding, when the scale search made it
    if options.scale == "qubo":
        search_start = time.perf_counter()
        scales, solved = _solved_best_scales(terms, scheme, bias_scales, options.seed)
        search_seconds = time.perf_counter() - search_start
    else:
        scales = choose_scales(options.scale, layer.weight, scheme, statistics.x_gram, terms.weight_cross)
    problem = terms.problem(scheme, scales, bias_scales)
    if options.dump_dir is not None:
        exchange.write_problem(options.dump_dir, stem, problem)
    start = time.perf_counter()
    if options.solution_dir is not None:
        choice = exchange.read_solution(options.solution_dir, layer.name, problem)
    elif solved is not None and options.solver.name == FastSolver.name:
        choice = solved
    else:
        choice = options.solver.solve(problem, options.seed, progress)
    seconds = time.perf_counter() - start + search_seconds

    mean_error = terms.mean_error(problem, choice) if options.bias_correction else None
    shift, bias, bias_storage = mean_error, None, "float"
    if terms.with_bias:
        bias_storage = onnx.TensorProto.DataType.Name(grid.storage[0])
    elif options.bias == "int32" and layer.bias is not None:
        bias = _int32_bias(layer, scheme, scales, quantizer, mean_error)
        shift, bias_storage = None, "INT32"  # the correction is folded into the integer bias
    n, f = layer.shape
    cost = problem.energy(choice)
    report = LayerReport(
        name=layer.name, form=layer.form, n_out=n, f_in=f, bits=scheme.bits,
        storage=onnx.TensorProto.DataType.Name(grid.storage[0]),
        free_fraction=float(problem.rounding.free.mean()),
        cost_rtn=problem.energy(RoundToNearest().solve(problem)),
        cost_solved=cost,
        lower_bound=float(lower_bounds(problem).sum()) if options.lower_bound else None,
        solve_seconds=seconds,
        cost_bias_corrected=None if mean_error is None else cost - float(mean_error @ mean_error),
        bias=bias_storage)
    return SolvedLayer(layer, scheme, scales, problem, choice, report, bias_scales, bias, quantizer, shift)


def _solved_best_scales(terms: _LayerTerms, scheme: Scheme, bias_scales: GroupScales | None,
                        seed: int) -> tuple[GroupScales, np.ndarray]:
    """``--scale qubo``: the best few clipping ratios by round-to-nearest cost, each solved by
    the fast engine; per row (one set for a tensor-wide scale) the one with the least cost.
    Rows are independent problems, so the chosen rows' roundings are returned too. The first
    candidate is ``--scale mse``'s choice: no row costs more than with it."""
    layer = terms.layer
    candidates = candidate_scales(layer.weight, scheme, terms.statistics.x_gram, terms.weight_cross,
                                  QUBO_CANDIDATES)
    costs, choices = [], []
    for scales in candidates:
        problem = terms.problem(scheme, scales, bias_scales)
        choices.append(FastSolver().solve(problem, seed))
        costs.append(problem.neuron_energies(choices[-1]))
    costs = np.array(costs)  # [candidates, n]
    if scheme.granularity == "tensor":
        best = np.full(layer.shape[0], int(costs.sum(axis=1).argmin()))
    else:
        best = costs.argmin(axis=0)
    rows = np.arange(layer.shape[0])
    scales = GroupScales(np.stack([c.scale for c in candidates])[best, rows],
                         np.stack([c.zero_point for c in candidates])[best, rows], candidates[0].width)
    return scales, np.stack(choices)[best, rows]


def _int32_bias(layer: DenseLayer, scheme: Scheme, scales: GroupScales, quantizer: InputQuantizer,
                shift: np.ndarray | None) -> QuantizedBias:
    """The QDQ convention: INT32, zero point 0, scale = input scale x weight scale (per row; a
    row with block scales uses its largest), with the bias correction folded in."""
    weight_scale = scales.scale[0, 0] if scheme.granularity == "tensor" else scales.scale.max(axis=1)
    scale = np.asarray(quantizer.scale * weight_scale, dtype=np.float32).astype(np.float64)
    bias = layer.bias if shift is None else layer.bias + shift
    integers = np.round(bias / scale)
    if np.abs(integers).max(initial=0) > INT32_MAX:
        raise QuboInputError(f"the bias of layer '{layer.name}' does not fit INT32 at scale input x weight "
                             "scale; use --bias float")
    return QuantizedBias(integers.astype(np.int64), scale, 0, onnx.TensorProto.INT32)


def rewrite(model: onnx.ModelProto, quantized: list[QuantizedLayer]) -> onnx.ModelProto:
    """Integer initializers + DequantizeLinear in place of the float weights, checked."""
    weights = [_quantized_weight(q) for q in quantized]
    target_opset = max(q.scheme.opset for q in quantized)
    try:
        return run_passes(model, [RaiseOpset(target_opset), InsertDequantize(weights), CheckModel()])
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise QuboInputError(f"cannot rewrite the model: {exc}") from None


def _quantized_weight(q: QuantizedLayer) -> QuantizedWeight:
    """The graph pass's view of a layer: scales shaped as DequantizeLinear takes them."""
    scales, storage = q.scales, q.scheme.grid.storage[0]
    if q.scheme.granularity == "tensor":
        scale, zero_point = scales.scale[0, 0], scales.zero_point[0, 0]
    elif q.scheme.granularity == "channel":
        scale, zero_point = scales.scale[:, 0], scales.zero_point[:, 0]
    else:
        scale, zero_point = scales.scale, scales.zero_point
    weight = QuantizedTensor(q.integers, np.asarray(scale), None if q.scheme.symmetric else np.asarray(zero_point),
                             storage, scales.width if q.scheme.granularity == "block" else 0)
    bias = None
    if q.bias is not None:
        bias = QuantizedTensor(q.bias.integers, q.bias.scale,
                               np.full(q.bias.scale.shape, q.bias.zero_point) if q.bias.zero_point else None,
                               q.bias.storage)
    activation = None
    if q.input_quantizer is not None:
        activation = ActivationQuantization(q.input_quantizer.scale, q.input_quantizer.zero_point,
                                            q.input_quantizer.storage)
    return QuantizedWeight(q.layer.weight_name, weight, q.layer.input_rank, q.bias_shift,
                           q.layer.bias_name if bias is not None else None, bias, activation)
