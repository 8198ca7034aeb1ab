"""One layer's quantization: scales -> QUBO -> rounding -> bias, and its report.

``prepare_layer`` chooses the scales and builds the layer's QUBO from its input statistics
(``LayerTerms``: Gram, cross and offset terms, qubo.py); the rounding comes from the plan's
solver (``LayerWork.solve``) or from outside (``--load-solution``); ``LayerWork.finish`` applies
the bias policy and measures the costs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import onnx

from .calibration.spread import shrinkage_damping
from .core.determinism import one_blas_thread
from .core.errors import OptionError
from .core.grid import Granularity, GroupScales, InputQuantizer, Scheme, WeightCodes
from .core.options import AUTO, BiasMode, Damping, ScaleMethod
from .core.progress import Progress
from .core.report import LayerReport
from .core.types import DenseLayer, InputStatistics, QuantizedBias, QuantizedLayer
from .plan import LayerPlan
from .rounding import workers
from .rounding.bounds import lower_bounds
from .rounding.qubo import LayerProblem, build_problem, repeated_gram
from .rounding.scales import (
    QUBO_CANDIDATES,
    candidate_scales,
    choose_scales,
    fitted_scales,
    rounding_cost,
    tensor_scales,
)
from .rounding.solvers import FastSolver, RoundToNearest
from .rounding.solvers.exact import optimal_rounding

INT32_MAX = 2 ** 31 - 1
SMALL_GROUP_FREE = 12  # a Conv group's neurons with at most this many free weights are solved exactly


@dataclass(frozen=True, eq=False)
class LayerTerms:
    """What the QUBO of a layer needs besides its scales (qubo.py): Gram, cross, offset."""

    layer: DenseLayer
    statistics: InputStatistics
    with_bias: bool  # the bias is the last variable of each neuron
    weight: np.ndarray  # the layer's weight, read once for all the terms
    centered: bool = False  # bias correction follows: the error it leaves, i.e. the moments about the means
    damping: Damping = 0.0  # ridge on the weights' diagonal of ``gram``, a fraction of its mean (--damping)

    @cached_property
    def ridge(self) -> float:
        """``damping`` as a fraction of the weights' mean diagonal; ``auto``: Ledoit and Wolf's
        shrinkage of this input's Gram matrix, from its calibration samples' spread."""
        if self.damping != AUTO:
            return float(self.damping)
        if self.statistics.spread is None:
            raise ValueError(f"layer '{self.layer.name}': damping auto needs its input's sample spread, which "
                             "calibration did not measure (calibrate with spread=True)")
        f = self.layer.shape[1]
        return shrinkage_damping(self.statistics.spread, self.output_gram[:f, :f])

    @cached_property
    def gram(self) -> np.ndarray:
        """The Gram matrix of the objective: ``output_gram`` with ``ridge`` times the mean of the
        weights' diagonal added to that diagonal (the bias variable's entry left as it is)."""
        gram = self.output_gram
        if not self.ridge:
            return gram
        f = self.layer.shape[1]
        diagonal = np.einsum("ii->i", gram)[:f]
        ridge = self.ridge * float(diagonal.mean())
        gram = gram.copy()
        np.einsum("ii->i", gram)[:f] += ridge
        return gram

    @cached_property
    def output_gram(self) -> np.ndarray:
        """The Gram matrix whose cost is the output error: what the report states."""
        if self.with_bias:
            return self.statistics.gram
        x_gram = self.statistics.x_gram
        if not self.centered:
            return x_gram
        mean = self.statistics.gram[-1, :-1]  # E[x~]
        return x_gram - np.outer(mean, mean)

    @cached_property
    def _input_cross(self) -> np.ndarray | None:
        """E[z d^T] for the weight (and bias) rows, about the means when ``centered``."""
        cross = self.statistics.cross
        if cross is None:
            return None
        m = len(self.gram)
        if not self.centered:
            return cross[:m]
        return cross[:m] - np.outer(self.statistics.gram[-1, :m], cross[-1])  # E[x~ d^T] - E[x~] E[d]^T

    @cached_property  # computed once however many scale candidates are tried
    def cross(self) -> np.ndarray | None:
        """[n, m] in output units: alpha * E[z d^T] w_i (None when the inputs are the float ones)."""
        if self._input_cross is None:
            return None
        return self.layer.gain * self.weight @ self._input_cross.T

    @cached_property
    def weight_cross(self) -> np.ndarray | None:
        """The same for the weight columns, in weight units (for the scale search)."""
        f = self.layer.shape[1]
        return None if self._input_cross is None else self.weight @ self._input_cross[:f].T

    @property
    def weight_gram(self) -> np.ndarray:
        """The Gram block of the weight columns (for the scale search)."""
        return self.gram[:self.layer.shape[1], :self.layer.shape[1]]

    @cached_property
    def offset(self) -> np.ndarray | None:
        drift = self.statistics.drift
        if drift is None:
            return None
        if self.centered:
            assert self.statistics.cross is not None  # drift comes with cross
            drift = drift - np.outer(self.statistics.cross[-1], self.statistics.cross[-1])  # Cov(d)
        w = self.weight
        return self.layer.gain ** 2 * np.einsum("if,if->i", w @ drift, w)

    def problem(self, scheme: Scheme, scales: GroupScales, bias_scales: GroupScales | None,
                levels: int = 2) -> LayerProblem:
        n, f = self.layer.shape
        scale = scales.per_column(scales.scale, f)
        zero_point = scales.zero_point if scheme.float_zero_point else scales.zero_point.astype(np.int16)
        zero_point = scales.per_column(zero_point, f)  # int16: a grid of at most 8 bits
        values, gain = self.weight, self.layer.gain
        if bias_scales is not None and self.layer.bias is not None:
            values = np.hstack([values, self.layer.bias[:, None]])
            scale = np.hstack([np.broadcast_to(scale, (n, f)), bias_scales.scale])
            zero_point = np.hstack([np.broadcast_to(zero_point, (n, f)), bias_scales.zero_point])
            gain = np.r_[np.full(f, self.layer.gain), 1.0]
        return build_problem(values, scale, zero_point, gain, scheme.grid, self.gram, self.cross, self.offset,
                             levels)

    def mean_error(self, problem: LayerProblem, choice: np.ndarray) -> np.ndarray:
        """E[y - y_q] per output: cancelled by adding it to the output (bias correction)."""
        shift = problem.errors(choice) @ self.statistics.gram[-1, :problem.weights]  # E[z~]
        if self.statistics.cross is not None:
            shift = shift + self.layer.gain * self.weight @ self.statistics.cross[-1]
        return shift


@dataclass(frozen=True, eq=False)
class SolvedLayer:
    """One layer's scales, QUBO, chosen rounding and report."""

    plan: LayerPlan
    scales: GroupScales
    problem: LayerProblem
    choice: np.ndarray
    report: LayerReport
    bias_scales: GroupScales | None = None  # the bias is the last variable of each neuron's QUBO
    bias: QuantizedBias | None = None  # or a fixed integer bias (INT32)
    input_quantizer: InputQuantizer | None = None
    bias_shift: np.ndarray | None = None
    terms: LayerTerms | None = None  # what a float bias correction of another rounding needs

    def output_cost(self, choice: np.ndarray) -> float:
        """What the report states for another ``choice`` on the same problem: its output error
        (after a bias correction, the error the correction leaves), without a damped objective's ridge."""
        return (self.problem if self.terms is None else output_problem(self.problem, self.terms)).energy(choice)

    def quantized(self, choice: np.ndarray | None = None) -> QuantizedLayer:
        """The integer weights of this rounding (or of another ``choice`` on the same problem,
        with its own float bias correction where this one has one)."""
        shift = self.bias_shift
        if choice is not None and shift is not None and self.terms is not None:
            shift = self.terms.mean_error(self.problem, choice)
        integers = self.problem.integers(self.choice if choice is None else choice)
        scheme, f = self.plan.scheme, self.plan.layer.shape[1]
        bias = self.bias
        if self.bias_scales is not None:
            bias = QuantizedBias(integers[:, f], np.asarray(self.bias_scales.scale[0, 0]),
                                 int(self.bias_scales.zero_point[0, 0]), scheme.grid.storage[0])
        return QuantizedLayer(self.plan.layer, WeightCodes(compact(integers[:, :f]), self.scales, scheme), bias,
                              self.input_quantizer, shift)


def output_problem(problem: LayerProblem, terms: LayerTerms) -> LayerProblem:
    """``problem`` on the output error's Gram matrix: itself, or without its ridge (``--damping``)."""
    if not terms.ridge:
        return problem
    return replace(problem, gram=repeated_gram(terms.output_gram, len(problem.rounding.digits)))


def compact(codes: np.ndarray) -> np.ndarray:
    """Weight codes in the smallest integer type holding them (int8 or uint8 for 2-8 bits): a
    run keeps every layer's codes until the rewrite, an eighth of the memory of int64."""
    low, high = int(codes.min(initial=0)), int(codes.max(initial=0))
    for kind in (np.int8, np.uint8, np.int16, np.int32):
        if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
            return codes.astype(kind)
    return codes


@dataclass(frozen=True, eq=False)
class LayerWork:
    """A layer's scales and QUBO, waiting for a rounding."""

    plan: LayerPlan
    terms: LayerTerms
    scales: GroupScales
    bias_scales: GroupScales | None
    problem: LayerProblem
    quantizer: InputQuantizer | None
    presolved: np.ndarray | None  # the fast solver's rounding, when the scale search made it
    search_seconds: float

    @one_blas_thread()
    def solve(self, progress: Progress) -> np.ndarray:
        """The plan's solver's rounding (the scale search's own when it already solved with it)."""
        plan = self.plan
        if self.presolved is not None and plan.solver.name == FastSolver.name:
            return self.presolved
        if _small_group(plan) and plan.solver.name == FastSolver.name:
            return fast_rounding(plan, self.problem, progress)
        if plan.workers > 1 or plan.ray_address is not None:  # the same bits, rows on other processes
            return workers.solve_layer(self.problem, plan.solver.name, plan.seed, plan.workers, plan.ray_address,
                                       getattr(plan.solver, "params", None))
        return plan.solver.solve(self.problem, plan.seed, progress)

    @one_blas_thread()
    def finish(self, choice: np.ndarray, seconds: float) -> SolvedLayer:
        """Bias policy and report for the rounding ``choice`` (found in ``seconds``)."""
        plan, problem, layer = self.plan, self.problem, self.plan.layer
        grid = plan.scheme.grid
        mean_error = self.terms.mean_error(problem, choice) if plan.bias_correction else None
        rtn = RoundToNearest().solve(problem)
        shift, bias, bias_storage = mean_error, None, "float"
        if plan.bias == BiasMode.QUANTIZE:
            bias_storage = onnx.TensorProto.DataType.Name(grid.storage[0])
        elif plan.bias == BiasMode.INT32 and self.quantizer is not None:
            bias = _int32_bias(layer, plan.scheme, self.scales, self.quantizer, mean_error)
            shift, bias_storage = None, "INT32"  # the correction is folded into the integer bias
        n, f = layer.shape
        free = problem.rounding.free  # an energy is O(n f^2): not computed twice for the same rounding
        # the report states the output error, not a damped objective
        measured = output_problem(problem, self.terms)
        cost = measured.energy(choice)
        cost_rtn = cost if np.array_equal(rtn & free, choice & free) else measured.energy(rtn)
        corrected = corrected_rtn = None
        if mean_error is not None:  # the problem is centered: its energy is what the correction leaves
            rtn_mean = self.terms.mean_error(problem, rtn)
            corrected, corrected_rtn = cost, cost_rtn
            cost, cost_rtn = cost + float(mean_error @ mean_error), cost_rtn + float(rtn_mean @ rtn_mean)
        report = LayerReport(
            name=layer.name, form=layer.label, n_out=n, f_in=f, bits=plan.scheme.bits,
            storage=onnx.TensorProto.DataType.Name(grid.storage[0]),
            free_fraction=float(problem.rounding.free.mean()),
            cost_rtn=cost_rtn,
            cost_solved=cost,
            lower_bound=float(lower_bounds(measured).sum()) if plan.lower_bound else None,
            solve_seconds=seconds + self.search_seconds,
            cost_bias_corrected=corrected,
            cost_rtn_bias_corrected=corrected_rtn,
            bias=bias_storage,
            damping=self.terms.ridge,
            vectors=self.terms.statistics.count)
        return SolvedLayer(plan, self.scales, problem, choice, report, self.bias_scales, bias, self.quantizer, shift,
                           self.terms)


def _small_group(plan: LayerPlan) -> bool:
    """One group of a grouped Conv: a few neurons of a few weights, often hundreds of groups."""
    return plan.layer.group is not None and plan.layer.view.small_problems


def fast_rounding(plan: LayerPlan, problem: LayerProblem, progress: Progress = Progress()) -> np.ndarray:
    """The fast solver's rounding as the run applies it (in this process): a small group's
    proven optimum by branch and bound (under a millisecond up to SMALL_GROUP_FREE weights), or
    above that the engine without its tabu stage, whose fixed budget is a layer's; else the
    engine. The scale searches round with it too, so what they keep is what the run writes."""
    if _small_group(plan):
        if problem.rounding.free.sum(axis=1).max(initial=0) <= SMALL_GROUP_FREE:
            return optimal_rounding(problem, RoundToNearest().solve(problem))
        return FastSolver(tabu_work=0).solve(problem, plan.seed, progress)
    engine = plan.solver if isinstance(plan.solver, FastSolver) else FastSolver()  # --effort's, where it is fast
    return engine.solve(problem, plan.seed, progress)


@one_blas_thread()
def prepare_layer(plan: LayerPlan, statistics: InputStatistics, quantizer: InputQuantizer | None) -> LayerWork:
    """Scales and QUBO of one layer from the statistics of the inputs it will see."""
    layer = plan.layer
    # with bias correction the mean error is removed afterwards: solve (and choose scales) for what is left
    terms = LayerTerms(layer, statistics, plan.bias_is_variable, layer.weight, centered=plan.bias_correction,
                       damping=plan.damping)
    start = time.perf_counter()
    plan, scales = _chosen_grid(plan, terms) if plan.other_grid is not None else (plan, None)
    scheme = plan.scheme
    bias_scales = tensor_scales(layer.bias, scheme) if plan.bias_is_variable and layer.bias is not None else None
    presolved = None
    if plan.scale == ScaleMethod.QUBO:
        scales, presolved = _solved_best_scales(plan, terms, bias_scales)
    elif plan.scale == ScaleMethod.FIT:
        if scales is None:
            scales = choose_scales(ScaleMethod.MSE, terms.weight, scheme, terms.weight_gram, terms.weight_cross)
        scales, presolved = _fitted_scales(plan, terms, scales, bias_scales)
    elif scales is None:
        scales = choose_scales(plan.scale, terms.weight, scheme, terms.weight_gram, terms.weight_cross)
    search_seconds = time.perf_counter() - start
    problem = terms.problem(scheme, scales, bias_scales, plan.levels)
    return LayerWork(plan, terms, scales, bias_scales, problem, quantizer, presolved, search_seconds)


def _chosen_grid(plan: LayerPlan, terms: LayerTerms) -> tuple[LayerPlan, GroupScales]:
    """The plan with the grid chosen between ``scheme`` and ``other_grid``, and its scales
    (``scale qubo``: its ``mse`` ones). Each grid gets its own scale search; the one whose
    round-to-nearest cost on the whole Gram matrix is lower is kept (the first on a tie): an
    asymmetric grid fits weights that lean to one side, and at 2 bits the signed grid
    {-2, -1, 0, 1} leaves the positive weights one level."""
    assert plan.other_grid is not None
    method = ScaleMethod.MSE if plan.scale in (ScaleMethod.QUBO, ScaleMethod.FIT) else plan.scale
    found = [(scheme, choose_scales(method, terms.weight, scheme, terms.weight_gram, terms.weight_cross))
             for scheme in (plan.scheme, plan.other_grid)]
    costs = [rounding_cost(terms.weight, scales, scheme, terms.weight_gram, terms.weight_cross)
             for scheme, scales in found]
    scheme, scales = found[int(np.argmin(costs))]
    return plan.with_grid(scheme), scales


def _solved_best_scales(plan: LayerPlan, terms: LayerTerms,
                        bias_scales: GroupScales | None) -> tuple[GroupScales, np.ndarray]:
    """``scale qubo``: the best few clipping ratios by round-to-nearest cost, each solved by
    the fast engine; per row (one set for a tensor-wide scale) the one with the least cost.
    Rows are independent problems, so the chosen rows' roundings are returned too. The first
    candidate is ``scale mse``'s choice: no row costs more than with it."""
    scheme = plan.scheme
    candidates = candidate_scales(terms.weight, scheme, terms.weight_gram, terms.weight_cross,
                                  QUBO_CANDIDATES)
    costs, choices = [], []
    for scales in candidates:
        problem = terms.problem(scheme, scales, bias_scales, plan.levels)
        choices.append(fast_rounding(plan, problem))
        costs.append(problem.neuron_energies(choices[-1]))
    scales, choice, _ = _best_rows(candidates, choices, costs, scheme)
    return scales, choice


FIT_ROUNDS = 2  # ``scale fit``: on the MNIST MLP at 3 bits a second refit gains a third of the first, a third <0.5%


def _fitted_scales(plan: LayerPlan, terms: LayerTerms, scales: GroupScales,
                   bias_scales: GroupScales | None) -> tuple[GroupScales, np.ndarray]:
    """``scale fit``: solve on ``scales`` with the fast engine, refit the scales (and float zero
    points) to the chosen codes by least squares on the layer's cost (scales.fitted_scales), solve
    again; per row (a tensor-wide scale: for all) the rounding with the least exact cost is kept,
    so no row costs more than on ``scales`` alone. Repeated ``FIT_ROUNDS`` times."""
    f, scheme, levels = terms.layer.shape[1], plan.scheme, plan.levels
    problem = terms.problem(scheme, scales, bias_scales, levels)
    choice = fast_rounding(plan, problem)
    cost = problem.neuron_energies(choice)
    for k in range(FIT_ROUNDS):
        if k:  # the rows kept so far, each on its own scales
            problem = terms.problem(scheme, scales, bias_scales, levels)
        codes = problem.integers(choice)[:, :f]
        refit = fitted_scales(terms.weight, codes, scales, scheme, terms.weight_gram, terms.weight_cross)
        refit_problem = terms.problem(scheme, refit, bias_scales, levels)
        refit_choice = fast_rounding(plan, refit_problem)
        refit_cost = refit_problem.neuron_energies(refit_choice)
        scales, choice, cost = _best_rows([scales, refit], [choice, refit_choice], [cost, refit_cost], scheme)
    return scales, choice


def _best_rows(candidates: list[GroupScales], choices: list[np.ndarray], costs: list[np.ndarray],
               scheme: Scheme) -> tuple[GroupScales, np.ndarray, np.ndarray]:
    """Per row, the candidate scales, rounding and cost with the least cost (the first on a tie);
    a tensor-wide scale: the candidate with the least total."""
    cost_table = np.array(costs)  # [candidates, n]
    n = cost_table.shape[1]
    if scheme.granularity == Granularity.TENSOR:
        best = np.full(n, int(cost_table.sum(axis=1).argmin()))
    else:
        best = cost_table.argmin(axis=0)
    rows = np.arange(n)
    scales = GroupScales(np.stack([c.scale for c in candidates])[best, rows],
                         np.stack([c.zero_point for c in candidates])[best, rows], candidates[0].width)
    return scales, np.stack(choices)[best, rows], cost_table[best, rows]


def _int32_bias(layer: DenseLayer, scheme: Scheme, scales: GroupScales, quantizer: InputQuantizer,
                shift: np.ndarray | None) -> QuantizedBias:
    """The QDQ convention: INT32, zero point 0, scale = input scale x weight scale (per row; a
    row with block scales uses its largest), with the bias correction folded in."""
    assert layer.bias is not None  # the plan asks for INT32 only where there is a bias
    weight_scale = scales.scale[0, 0] if scheme.granularity == Granularity.TENSOR else scales.scale.max(axis=1)
    scale = np.asarray(quantizer.scale * weight_scale, dtype=np.float32).astype(np.float64)
    bias = layer.bias if shift is None else layer.bias + shift
    integers = np.round(bias / scale)
    if np.abs(integers).max(initial=0) > INT32_MAX:
        raise OptionError(f"the bias of layer '{layer.name}' does not fit INT32 at scale input x weight scale; "
                          "use {bias} float", "bias")
    return QuantizedBias(integers.astype(np.int64), scale, 0, onnx.TensorProto.INT32)
