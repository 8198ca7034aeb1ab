"""``onnx-qubo compare``: the paper's study on any model, in one command.

For every bit width x scale method x solver: quantize (calibration gathered once), evaluate
in onnxruntime, and record accuracy (or top-1 agreement), drop from float, total QUBO cost,
model size and time. Optionally, per bit width, a cost-accuracy study: random feasible
roundings around the best QUBO solution, each evaluated, with the Pearson correlation
between total QUBO cost and accuracy (the paper: linear at int2, none at int8).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..config import QuantizeConfig, default_damping
from ..core.options import Damping, ScaleMethod
from ..core.progress import Progress
from ..evaluation.perplexity import language_model
from ..evaluation.verify import Reference, evaluate
from ..layer import SolvedLayer
from ..model.groups import merge_groups
from ..model.lowering import rewrite
from ..pipeline import Calibrated, sequential_by_default, solve_layers
from ..plan import make_plan

FLIP_RATES = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5)  # cycled over samples


@dataclass(frozen=True)
class Row:
    bits: int
    scale: str
    solver: str
    accuracy: float  # accuracy with labels, else top-1 agreement with the float model
    drop: float  # float accuracy - accuracy (points as a fraction)
    qubo_cost: float  # total over layers
    size_bytes: int
    seconds: float


@dataclass(frozen=True)
class CostSample:
    bits: int
    flip_rate: float  # share of free weights flipped away from the solution
    qubo_cost: float
    accuracy: float


@dataclass
class Comparison:
    model: str
    metric: str  # "accuracy" or "top-1 agreement"
    float_accuracy: float
    float_size_bytes: int
    evaluation_samples: int
    scheme: str  # granularity, zero points, bias, activations, in words
    rows: list[Row] = field(default_factory=list)
    samples: list[CostSample] = field(default_factory=list)

    def correlations(self) -> dict[int, float | None]:
        """Pearson r between total QUBO cost and accuracy, per bit width (None: constant data)."""
        result = {}
        for bits in sorted({s.bits for s in self.samples}, reverse=True):
            cost = np.array([s.qubo_cost for s in self.samples if s.bits == bits])
            acc = np.array([s.accuracy for s in self.samples if s.bits == bits])
            ok = len(cost) > 2 and cost.std() > 0 and acc.std() > 0
            result[bits] = float(np.corrcoef(cost, acc)[0, 1]) if ok else None
        return result

    def to_json(self) -> str:
        data = asdict(self)
        data["correlations"] = {str(k): v for k, v in self.correlations().items()}
        return json.dumps(data, indent=2)

    def to_markdown(self) -> str:
        lines = [f"Model `{self.model}`: float {self.metric} {self.float_accuracy:.2%} on "
                 f"{self.evaluation_samples} samples, {self.float_size_bytes:,} bytes. Scheme: {self.scheme}.", "",
                 f"| bits | scale | solver | {self.metric} | drop (points) | total QUBO cost | size (bytes) "
                 "| time (s) |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.bits} | {r.scale} | {r.solver} | {r.accuracy:.2%} | {-r.drop * 100:+.2f} | "
                         f"{r.qubo_cost:.4g} | {r.size_bytes:,} | {r.seconds:.1f} |")
        if self.samples:
            lines += ["", "| bits | samples | Pearson r (QUBO cost vs " + self.metric + ") |", "|---|---|---|"]
            for bits, pearson in self.correlations().items():
                count = sum(1 for s in self.samples if s.bits == bits)
                lines.append(f"| {bits} | {count} | {'n/a (constant)' if pearson is None else f'{pearson:+.3f}'} |")
        return "\n".join(lines)


def study_damping(model: onnx.ModelProto, bits: int) -> Damping:
    """The studies' ``--damping``: quantize's default for a model other than a language model (so
    they measure the integers it writes), none for a language model (as its other defaults)."""
    return 0.0 if language_model(model) is not None else default_damping(False, bits)


def compare(calibrated: Calibrated, reference: Reference, bits_list: list[int], scales: list[ScaleMethod],
            solvers: list[str], samples: int, seed: int, progress: Progress,
            model_name: str, scheme: QuantizeConfig) -> Comparison:
    """Every configuration quantized from the same calibration and scored against the same
    float reference; ``samples`` random roundings per bit width around its best QUBO solution.
    ``scheme``: granularity, zero points, bias, activations, sequential (its bits, scale and
    solver are replaced by each configuration's)."""
    if scheme.rounding.sequential is None:  # unset: as quantize resolves it
        scheme = scheme.updated(sequential=sequential_by_default(calibrated.model, calibrated.layers))
    has_labels = reference.has_labels
    metric = "accuracy" if has_labels else "top-1 agreement"
    float_pred = reference.scores.argmax(axis=-1)
    float_accuracy = float((float_pred == reference.labels).mean()) if has_labels else 1.0
    result = Comparison(model_name, metric, float_accuracy, calibrated.model.ByteSize(),
                        reference.samples, scheme.describe())

    def score(model: onnx.ModelProto) -> float:
        ev = evaluate(reference, model, Progress(), check_levels=False)
        return ev.quantized_accuracy if ev.quantized_accuracy is not None else ev.top1_agreement

    for bits in bits_list:
        best: list[SolvedLayer] | None = None
        best_cost = np.inf
        for scale in scales:
            for solver in solvers:
                start = time.perf_counter()
                options = scheme.updated(bits=bits, scale=scale, solver=solver, seed=seed, lower_bound=False,
                                         damping=study_damping(calibrated.model, bits))
                solved = list(solve_layers(calibrated, make_plan(options, calibrated.layers), progress))
                model = rewrite(calibrated.model, merge_groups([s.quantized() for s in solved])).model
                accuracy = score(model)
                cost = sum(s.report.final_cost for s in solved)
                result.rows.append(Row(bits, str(scale), solver, accuracy, float_accuracy - accuracy, cost,
                                       model.ByteSize(), time.perf_counter() - start))
                if solver != "rtn" and cost < best_cost:
                    best, best_cost = solved, cost
        if samples and best is not None:
            result.samples += _cost_accuracy_samples(calibrated.model, best, bits, samples, seed, score)
    return result


def _cost_accuracy_samples(model, solved: list[SolvedLayer], bits, count, seed, score) -> list[CostSample]:
    """Roundings around the solution: flip a random share of the free weights of every layer."""
    rng = np.random.default_rng([seed, bits])
    out = []
    for k in range(count):
        rate = FLIP_RATES[k % len(FLIP_RATES)]
        quantized, cost = [], 0.0
        for s in solved:
            flips = s.problem.rounding.free & (rng.random(s.problem.shape) < rate)
            choice = s.choice ^ flips
            cost += s.output_cost(choice)
            quantized.append(s.quantized(choice))
        out.append(CostSample(bits, rate, cost, score(rewrite(model, merge_groups(quantized)).model)))
    return out
