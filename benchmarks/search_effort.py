"""The fast solver's search effort (``--effort``): each layer's cost and solve time at several efforts.

    python benchmarks/search_effort.py MODEL.onnx CALIB.npz --bits 3 --block-size 32 --efforts 1,4,8,16

Each layer of MODEL (one problem per layer: a grouped Conv's groups, which the run solves to
their proven optimum or without the tabu stage, are left out) is calibrated on the float model,
given its scales as a default run would (per-layer grid, bias correction where it has a bias,
``mse`` scales, no small layers at 8 bits), and solved by the fast solver at each effort; the
table gives the cost (the layer's output error, bias correction included) and the solve time,
and the costs as ratios to effort 1's. All from this one invocation.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from onnx_qubo.api import _dataset, _resolved, load_model, prepare
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.progress import Progress
from onnx_qubo.layer import prepare_layer
from onnx_qubo.pipeline import calibrate
from onnx_qubo.plan import make_plan
from onnx_qubo.rounding.solvers import FastSolver

QUIET = Progress()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--efforts", default="1,4,8,16")
    args = parser.parse_args()
    efforts = [int(e) for e in args.efforts.split(",")]
    model = prepare(load_model(args.model))
    config = _resolved(QuantizeConfig.from_flat(bits=args.bits, block_size=args.block_size, small_layers=0.0,
                                                sequential=False), model)
    calibrated = calibrate(model, _dataset(model, args.model, args.calib, ".calib.npz", 64), QUIET)
    plan = make_plan(config, calibrated.layers)
    print(f"# Search effort: {args.model.name}, {args.bits} bits, blocks of {args.block_size}\n")
    print(f"Command: `python benchmarks/search_effort.py {args.model.name} {args.calib.name} --bits {args.bits} "
          f"--block-size {args.block_size} --efforts {args.efforts}`; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())} at the start.\n")
    print("| layer | n x f | " + " | ".join(f"effort {e}: cost (s)" for e in efforts) + " | "
          + " | ".join(f"{e} / 1" for e in efforts[1:]) + " |")
    print("|---|---|" + "---|" * (2 * len(efforts) - 1))
    totals = [0.0] * len(efforts)
    seconds = [0.0] * len(efforts)
    for layer_plan in plan.layers:
        layer = layer_plan.layer
        if layer.group is not None:
            continue
        work = prepare_layer(layer_plan, calibrated.statistics[layer.statistics_key], None)
        costs, times = [], []
        for k, effort in enumerate(efforts):
            start = time.perf_counter()
            choice = FastSolver(effort=effort).solve(work.problem, layer_plan.seed, QUIET)
            took = time.perf_counter() - start
            costs.append(work.finish(choice, took).report.final_cost)
            times.append(took)
            totals[k] += costs[-1]
            seconds[k] += took
        n, f = layer.shape
        cells = [f"{cost:.4g} ({took:.1f})" for cost, took in zip(costs, times)]
        print(f"| {layer.name} | {n} x {f} | " + " | ".join(cells) + " | "
              + " | ".join(f"{c / costs[0]:.3f}" if costs[0] else "" for c in costs[1:]) + " |", flush=True)
    print("| **total** | | " + " | ".join(f"{t:.4g} ({s:.0f})" for t, s in zip(totals, seconds)) + " | "
          + " | ".join(f"{t / totals[0]:.3f}" for t in totals[1:]) + " |")


if __name__ == "__main__":
    main()
