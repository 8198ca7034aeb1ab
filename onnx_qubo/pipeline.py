"""The data flow of DESIGN.md section 3, one stage per line.

    model --calibrate (find_dense_layers, collect_statistics)--> layers + Gram matrices
          --solve_layers (choose_scales, build_problem, solver.solve)--> integer weights
          --rewrite (raise opset, insert DequantizeLinear, check)--> quantized model
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator, Mapping

import numpy as np
import onnx

from . import discovery, exchange
from .bounds import lower_bounds
from .calibration import collect_statistics
from .data import Dataset
from .errors import QuboInputError
from .grid import IntegerGrid
from .passes import CheckModel, InsertDequantize, QuantizedWeight, RaiseOpset, run_passes
from .progress import Progress
from .qubo import LayerProblem, build_problem
from .report import LayerReport
from .scales import choose_scales
from .solvers import RoundToNearest, Solver
from .types import DenseLayer, QuantizedLayer, SkippedNode


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

    def bits_for(self, layer: DenseLayer) -> int:
        return self.layer_bits.get(layer.name, self.bits)


@dataclass(frozen=True, eq=False)
class Calibrated:
    """A float model's dense layers and the Gram matrices of their inputs: gathered once,
    reusable for any number of quantization settings (``onnx-qubo compare``)."""

    model: onnx.ModelProto
    layers: list[DenseLayer]
    skipped: list[SkippedNode]
    grams: dict[str, np.ndarray]  # layer input tensor -> E[x x^T]
    means: dict[str, np.ndarray]  # layer input tensor -> E[x]


@dataclass(frozen=True, eq=False)
class SolvedLayer:
    """One layer's scales, QUBO, chosen rounding and report."""

    layer: DenseLayer
    scale: np.ndarray
    problem: LayerProblem
    choice: np.ndarray
    report: LayerReport
    bias_shift: np.ndarray | None = None

    def quantized(self, choice: np.ndarray | None = None) -> QuantizedLayer:
        """The integer weights of this rounding (or of another ``choice`` on the same problem,
        then without bias correction)."""
        if choice is None:
            return QuantizedLayer(self.layer, self.report.bits, self.problem.integers(self.choice),
                                  self.scale, self.bias_shift)
        return QuantizedLayer(self.layer, self.report.bits, self.problem.integers(choice), self.scale)


def quantize_model(model: onnx.ModelProto, calibration: Dataset, options: QuantizeOptions,
                   progress: Progress, exclude: Collection[str] = ()
                   ) -> tuple[onnx.ModelProto, list[LayerReport], list[SkippedNode]]:
    """Quantize every dense layer of ``model`` but the ``exclude``d ones; return the new model
    and what was done."""
    calibrated = calibrate(model, calibration, progress, exclude)
    unknown = set(options.layer_bits) - {layer.name for layer in calibrated.layers}
    if unknown:
        raise QuboInputError(f"--layer-bits names no quantized dense layer: {', '.join(sorted(unknown))} "
                             "(onnx-qubo inspect lists the layers)")
    quantized, reports = [], []
    for solved in solve_layers(calibrated, options, progress):
        quantized.append(solved.quantized())
        reports.append(solved.report)
    return rewrite(model, quantized), reports, calibrated.skipped


def calibrate(model: onnx.ModelProto, calibration: Dataset, progress: Progress,
              exclude: Collection[str] = ()) -> Calibrated:
    layers, skipped = find_layers(model, exclude)
    statistics = collect_statistics(model, layers, calibration, progress)
    grams = {name: stats.x_gram for name, stats in statistics.items()}
    means = {name: stats.mean for name, stats in statistics.items()}
    return Calibrated(model, layers, skipped, grams, means)


def solve_layers(calibrated: Calibrated, options: QuantizeOptions, progress: Progress) -> Iterator[SolvedLayer]:
    """Solve the layers one at a time (a caller that keeps only the integers frees each QUBO)."""
    layers = calibrated.layers
    stems = exchange.file_stems([layer.name for layer in layers])
    for layer, stem in zip(layers, stems):
        yield solve_layer(layer, stem, calibrated.grams[layer.input_name], calibrated.means[layer.input_name],
                          options, progress)
    if options.dump_dir is not None:
        exchange.write_index(options.dump_dir, [
            {"layer": layer.name, "file": f"{stem}.qubo.npz", "n_out": layer.shape[0],
             "f_in": layer.shape[1], "bits": options.bits_for(layer)} for layer, stem in zip(layers, stems)])


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


def solve_layer(layer: DenseLayer, stem: str, gram: np.ndarray, mean: np.ndarray,
                options: QuantizeOptions, progress: Progress) -> SolvedLayer:
    """Scales, QUBO, rounding and report for one layer (``stem`` names its exchange files)."""
    bits = options.bits_for(layer)
    grid = IntegerGrid(bits)
    scale = choose_scales(options.scale, layer.weight, grid, gram)
    problem = build_problem(layer.weight, layer.gain, scale, grid, gram)
    if options.dump_dir is not None:
        exchange.write_problem(options.dump_dir, stem, problem)
    start = time.perf_counter()
    if options.solution_dir is not None:
        choice = exchange.read_solution(options.solution_dir, layer.name, problem)
    else:
        choice = options.solver.solve(problem, options.seed, progress)
    seconds = time.perf_counter() - start
    shift = None
    if options.bias_correction:
        # E[y - y_q] = gain (W - W_q) E[x]: adding it to the output cancels the mean error
        shift = layer.gain * (layer.weight - problem.integers(choice) * scale[:, None]) @ mean
    n, f = layer.shape
    cost = problem.energy(choice)
    report = LayerReport(
        name=layer.name, form=layer.form, n_out=n, f_in=f, bits=bits,
        storage=onnx.TensorProto.DataType.Name(grid.storage[0]),
        free_fraction=float(problem.rounding.free.mean()),
        cost_rtn=problem.energy(RoundToNearest().solve(problem)),
        cost_solved=cost,
        lower_bound=float(lower_bounds(problem).sum()) if options.lower_bound else None,
        solve_seconds=seconds,
        cost_bias_corrected=None if shift is None else cost - float(shift @ shift))
    return SolvedLayer(layer, scale, problem, choice, report, shift)


def rewrite(model: onnx.ModelProto, quantized: list[QuantizedLayer]) -> onnx.ModelProto:
    """Integer initializers + DequantizeLinear in place of the float weights, checked."""
    grids = [IntegerGrid(q.bits) for q in quantized]
    weights = [QuantizedWeight(q.layer.weight_name, q.integers, q.scale, grid.storage[0],
                               q.layer.input_rank, q.bias_shift) for q, grid in zip(quantized, grids)]
    target_opset = max(grid.storage[1] for grid in grids)
    try:
        return run_passes(model, [RaiseOpset(target_opset), InsertDequantize(weights), CheckModel()])
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise QuboInputError(f"cannot rewrite the model: {exc}") from None
