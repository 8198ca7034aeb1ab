"""Damping held out: each layer's cost on calibration samples its scales and rounding did not see.

    python benchmarks/damping.py MODEL.onnx CALIB.npz --bits 3 --block-size 32 --dampings 0,0.01,auto

The calibration samples are split in halves. Each layer of MODEL (one problem per layer: a grouped
Conv's groups are left out) is calibrated on the float model's inputs from the first half, given its
scales and rounding as a default run would (per-layer grid, bias correction where it has a bias,
``mse`` scales, no small layers at 8 bits, effort 1) at each ``--damping``, and the table gives the
rounding's cost (the layer's output error, bias correction included) on the first half and on the
second, and the ridge ``auto`` chose from the first half's sample spread. The totals: summed costs, and
the geometric mean of the per-layer ratios to the first damping's (each layer counted once, whatever
its scale). All from this one invocation.
"""

from __future__ import annotations

import os
import platform
from dataclasses import replace

import numpy as np
from layer_halves import QUIET, arguments, held_out_problem, planned

from onnx_qubo.core.types import InputStatistics
from onnx_qubo.layer import LayerTerms, LayerWork, prepare_layer
from onnx_qubo.rounding.qubo import LayerProblem


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--dampings", default="0,0.01,auto")
    args = parser.parse_args()
    dampings: list[float | str] = [d if d == "auto" else float(d) for d in args.dampings.split(",")]
    plan, (seen, unseen) = planned(args, halves=True, spread="auto" in dampings)
    samples = [part.dataset.num_samples for part in (seen, unseen)]
    print(f"# Damping held out: {args.model.name}, {args.bits} bits, blocks of {args.block_size}\n")
    print(f"Command: `python benchmarks/damping.py {args.model.name} {args.calib.name} --bits {args.bits} "
          f"--block-size {args.block_size} --dampings {args.dampings}`; {samples[0]} samples seen, "
          f"{samples[1]} unseen; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())} at the start.\n")
    names = [f"--damping {d}" for d in dampings]
    print("| layer | n x f | auto's ridge | " + " | ".join(f"{name}: seen / unseen" for name in names) + " | "
          + " | ".join(f"{name} / first, unseen" for name in names[1:]) + " |")
    print("|---|---|---|" + "---|" * (2 * len(dampings) - 1))
    costs: list[list[float]] = [[] for _ in dampings]
    for layer_plan in plan.layers:
        layer = layer_plan.layer
        if layer.group is not None:
            continue
        key = layer.statistics_key
        cells, ridge = [], 0.0
        for k, damping in enumerate(dampings):
            work = prepare_layer(replace(layer_plan, damping=damping), seen.statistics[key], None)
            choice = work.solve(QUIET)
            held = held_out_problem(work, unseen.statistics[key])
            cost_seen = work.finish(choice, 0.0).report.final_cost
            costs[k].append(held.energy(choice) + _mean_square(held, work, choice, unseen.statistics[key]))
            cells.append(f"{cost_seen:.4g} / {costs[k][-1]:.4g}")
            ridge = work.terms.ridge if damping == "auto" else ridge
        n, f = layer.shape
        ratios = [c[-1] / costs[0][-1] if costs[0][-1] else None for c in costs[1:]]
        print(f"| {layer.name} | {n} x {f} | {ridge:.3g} | " + " | ".join(cells) + " | "
              + " | ".join("" if r is None else f"{r:.3f}" for r in ratios) + " |", flush=True)
    totals = [sum(c) for c in costs]
    base = np.array(costs[0])
    means = [float(np.exp(np.mean(np.log(np.array(c)[base > 0] / base[base > 0])))) for c in costs[1:]]
    print("| **total** (geometric mean of the ratios) | | | " + " | ".join(f"{t:.4g}" for t in totals) + " | "
          + " | ".join(f"{t / totals[0]:.3f} ({m:.3f})" for t, m in zip(totals[1:], means)) + " |")


def _mean_square(held: LayerProblem, work: LayerWork, choice: np.ndarray, statistics: InputStatistics) -> float:
    """The squared mean error a bias correction leaves on the unseen half: none, it is fitted on the
    seen half, so the unseen half pays the difference of the two halves' mean errors."""
    if not work.plan.bias_correction:
        return 0.0
    unseen_terms = LayerTerms(work.plan.layer, statistics, work.plan.bias_is_variable, work.plan.layer.weight,
                              centered=True)
    shift = work.terms.mean_error(work.problem, choice) - unseen_terms.mean_error(held, choice)
    return float(shift @ shift)


if __name__ == "__main__":
    main()
