"""The fast solver's search effort (``--effort``): each layer's cost and solve time at several efforts.

    python benchmarks/search_effort.py MODEL.onnx CALIB.npz --bits 3 --block-size 32 --efforts 1,4,8,16

Each layer of MODEL (one problem per layer: a grouped Conv's groups, which the run solves to
their proven optimum or without the tabu stage, are left out) is calibrated on the float model,
given its scales as a default run would (per-layer grid, bias correction where it has a bias,
``mse`` scales, no small layers at 8 bits), and solved by the fast solver at each effort; the
table gives the cost (the layer's output error, bias correction included) and the solve time,
and the costs as ratios to effort 1's. All from this one invocation.

With ``--held-out`` the calibration samples are split in halves: scales and roundings come from
the first, and the table adds the same roundings' costs on the second half's statistics (about its
own means) as ratios to effort 1's: whether a lower cost found by a longer search carries over to
samples it did not see.
"""

from __future__ import annotations

import os
import platform
import time

from layer_halves import QUIET, arguments, held_out_problem, planned

from onnx_qubo.layer import prepare_layer
from onnx_qubo.rounding.solvers import FastSolver


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--efforts", default="1,4,8,16")
    parser.add_argument("--held-out", action="store_true", help="also the costs on the second half of the samples")
    args = parser.parse_args()
    efforts = [int(e) for e in args.efforts.split(",")]
    plan, (calibrated, *held_out) = planned(args, args.held_out)
    print(f"# Search effort: {args.model.name}, {args.bits} bits, blocks of {args.block_size}\n")
    print(f"Command: `python benchmarks/search_effort.py {args.model.name} {args.calib.name} --bits {args.bits} "
          f"--block-size {args.block_size} --efforts {args.efforts}{' --held-out' * args.held_out}`; "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())} at the start.\n")
    ratios = [f"{e} / 1" for e in efforts[1:]] + [f"{e} / 1 held out" for e in efforts[1:] if held_out]
    print("| layer | n x f | " + " | ".join(f"effort {e}: cost (s)" for e in efforts) + " | "
          + " | ".join(ratios) + " |")
    print("|---|---|" + "---|" * (len(efforts) + len(ratios)))
    totals, unseen = [0.0] * len(efforts), [0.0] * len(efforts)
    seconds = [0.0] * len(efforts)
    for layer_plan in plan.layers:
        layer = layer_plan.layer
        if layer.group is not None:
            continue
        work = prepare_layer(layer_plan, calibrated.statistics[layer.statistics_key], None)
        other = held_out_problem(work, held_out[0].statistics[layer.statistics_key]) if held_out else None
        costs, times, elsewhere = [], [], []
        for k, effort in enumerate(efforts):
            start = time.perf_counter()
            choice = FastSolver(effort=effort).solve(work.problem, layer_plan.seed, QUIET)
            took = time.perf_counter() - start
            costs.append(work.finish(choice, took).report.final_cost)
            times.append(took)
            if other is not None:
                elsewhere.append(other.energy(choice))
                unseen[k] += elsewhere[-1]
            totals[k] += costs[-1]
            seconds[k] += took
        n, f = layer.shape
        cells = [f"{cost:.4g} ({took:.1f})" for cost, took in zip(costs, times)]
        shares = [c / costs[0] if costs[0] else None for c in costs[1:]]
        shares += [c / elsewhere[0] if elsewhere[0] else None for c in elsewhere[1:]]
        print(f"| {layer.name} | {n} x {f} | " + " | ".join(cells) + " | "
              + " | ".join("" if r is None else f"{r:.3f}" for r in shares) + " |", flush=True)
    shares = [t / totals[0] for t in totals[1:]] + [t / unseen[0] for t in unseen[1:] if held_out]
    print("| **total** | | " + " | ".join(f"{t:.4g} ({s:.0f})" for t, s in zip(totals, seconds)) + " | "
          + " | ".join(f"{r:.3f}" for r in shares) + " |")


if __name__ == "__main__":
    main()
