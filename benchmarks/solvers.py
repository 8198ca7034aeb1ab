"""Solver benchmark: QUBO cost, time and proof of quality, on the demo model and wide layers.

    python benchmarks/solvers.py                 # everything (about 5 minutes on 2 cores)
    python benchmarks/solvers.py --skip-sweep    # without the 64..4096 width sweep

Part 1, the MNIST demo model at 2 bits (each scale method): per layer and in total, the cost
and solve time of rtn, neal with default parameters (every neuron), fast, the certified lower
bound and the share of neurons where fast is no worse than neal; then neal with many more
sweeps and reads on a sample of neurons, against fast on the same neurons.
Part 2, optimality: fast against the exact branch and bound on neurons with 20 free weights,
from the real layers (20 random inputs of each) and from random correlated problems.
Part 3, a width sweep (n = f from 64 to 4096, 2,048 samples): wall time and peak memory of
quantizing one layer (clip-searched scales + fast), each in a fresh process.
All ratios are between runs made in this same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.calibration.statistics import collect_statistics
from onnx_qubo.core.grid import Scheme
from onnx_qubo.core.progress import Progress
from onnx_qubo.model.discovery import find_dense_layers
from onnx_qubo.rounding.bounds import lower_bounds
from onnx_qubo.rounding.qubo import LayerProblem, build_problem
from onnx_qubo.rounding.scales import choose_scales
from onnx_qubo.rounding.solvers import ExactSolver, FastSolver, NealSolver, RoundToNearest

ROOT = Path(__file__).resolve().parent.parent
QUIET = Progress()


def timed(solver, problem: LayerProblem) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    choice = solver.solve(problem, 0, QUIET)
    return choice, time.perf_counter() - start


def subproblem(problem: LayerProblem, rows: np.ndarray) -> LayerProblem:
    r = problem.rounding
    return LayerProblem(problem.gram, np.broadcast_to(problem.step, problem.shape)[rows],
                        type(r)(r.base[rows], r.frac[rows], r.free[rows]), problem.cross[rows], problem.offset[rows])


def channel_problem(w: np.ndarray, gain: float, scale: str, gram: np.ndarray, clip: float = 1.0) -> LayerProblem:
    """The 2-bit symmetric per-channel QUBO of weights w with ``scale`` ("minmax" or "mse"),
    the scales shrunk by ``clip``."""
    scheme = Scheme(2)
    scales = choose_scales(scale, w, scheme, gram)
    return build_problem(w, scales.scale * clip, 0, gain, scheme.grid, gram)


def mnist_problems(scale: str) -> list[tuple[str, LayerProblem]]:
    model = onnx.load(ROOT / "models" / "mnist_mlp.onnx")
    layers, _ = find_dense_layers(model)
    data = load_dataset(ROOT / "models" / "mnist_mlp.calib.npz", model)
    stats = collect_statistics(model, layers, data, QUIET)
    problems = []
    for layer in layers:
        gram = stats[layer.input_name].x_gram
        problems.append((layer.name, channel_problem(layer.weight, layer.gain, scale, gram)))
    return problems


def part_mnist(scale: str, sample: int) -> None:
    print(f"\n### MNIST demo model, 2 bits, `--scale {scale}`\n")
    print("| layer | n x f | rtn cost | neal cost | fast cost | lower bound | fast / neal | "
          "fast no worse than neal | neal time (s) | fast time (s) | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    totals = np.zeros(6)
    no_worse = count = 0
    sampled = []
    for name, problem in mnist_problems(scale):
        rtn = problem.energy(RoundToNearest().solve(problem))
        neal_choice, neal_time = timed(NealSolver(), problem)
        fast_choice, fast_time = timed(FastSolver(), problem)
        neal_e, fast_e = problem.neuron_energies(neal_choice), problem.neuron_energies(fast_choice)
        bound = lower_bounds(problem).sum()
        better = (fast_e <= neal_e * (1 + 1e-9)).sum()
        no_worse, count = no_worse + better, count + len(fast_e)
        totals += [rtn, neal_e.sum(), fast_e.sum(), bound, neal_time, fast_time]
        print(f"| {name} | {problem.shape[0]}x{problem.shape[1]} | {rtn:.4g} | {neal_e.sum():.4g} | "
              f"{fast_e.sum():.4g} | {bound:.3g} | {fast_e.sum() / neal_e.sum():.3f} | {better}/{len(fast_e)} | "
              f"{neal_time:.1f} | {fast_time:.2f} | {neal_time / fast_time:.0f}x |")
        rows = np.random.default_rng(0).choice(problem.shape[0], min(sample, problem.shape[0]), replace=False)
        sampled.append((name, subproblem(problem, rows), fast_e[rows]))
    rtn, neal, fast, bound, neal_time, fast_time = totals
    print(f"| **total** | | {rtn:.4g} | {neal:.4g} | {fast:.4g} | {bound:.3g} | {fast / neal:.3f} | "
          f"{no_worse}/{count} ({no_worse / count:.1%}) | {neal_time:.1f} | {fast_time:.2f} | "
          f"{neal_time / fast_time:.0f}x |")

    print(f"\nneal with 10 reads x 5,000 sweeps (50 times the default effort) on {sample} random neurons "
          "per layer, against fast on the same neurons:\n")
    print("| layer | neurons | neal (10x5k) cost | fast cost | fast / neal | neal time (s) |")
    print("|---|---|---|---|---|---|")
    for name, sub, fast_e in sampled:
        choice, seconds = timed(NealSolver(num_reads=10, num_sweeps=5000), sub)
        neal_e = sub.neuron_energies(choice)
        print(f"| {name} | {sub.shape[0]} | {neal_e.sum():.4g} | {fast_e.sum():.4g} | "
              f"{fast_e.sum() / neal_e.sum():.3f} | {seconds:.1f} |")


def part_optimality(instances: int) -> None:
    print("\n### Optimality on neurons small enough for the exact solver (20 free weights)\n")
    print("| source | neurons | fast optimal | worst fast / optimum | exact time (s) | fast time (s) |")
    print("|---|---|---|---|---|---|")
    sources = []
    for li, (name, problem) in enumerate(mnist_problems("minmax")):
        for trial in range(instances):
            rng = np.random.default_rng(100 * li + trial)
            cols = rng.choice(problem.shape[1], 20, replace=False)
            rows = rng.choice(problem.shape[0], min(64, problem.shape[0]), replace=False)
            w = (problem.rounding.base + problem.rounding.frac)[np.ix_(rows, cols)]
            gram = problem.gram[np.ix_(cols, cols)]
            sources.append((f"MNIST {name}", channel_problem(w, 1.0, "minmax", gram, clip=0.8)))
    for seed in range(instances * 3):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((200, 20)) @ rng.standard_normal((20, 20)) * 0.5 + 0.3
        w = rng.standard_normal((64, 20))
        sources.append(("random correlated", channel_problem(w, 1.0, "minmax", x.T @ x / 200, clip=0.8)))
    summary: dict[str, list] = {}
    for label, problem in sources:
        exact_choice, exact_time = timed(ExactSolver(), problem)
        fast_choice, fast_time = timed(FastSolver(), problem)
        exact_e, fast_e = problem.neuron_energies(exact_choice), problem.neuron_energies(fast_choice)
        optimal = np.isclose(fast_e, exact_e, rtol=1e-9, atol=1e-15)
        ratio = np.max(np.where(exact_e > 0, fast_e / np.maximum(exact_e, 1e-300), 1.0))
        entry = summary.setdefault(label, [0, 0, 1.0, 0.0, 0.0])
        entry[0] += optimal.sum()
        entry[1] += len(optimal)
        entry[2] = max(entry[2], ratio)
        entry[3] += exact_time
        entry[4] += fast_time
    for label, (hits, total, worst, exact_time, fast_time) in summary.items():
        print(f"| {label} | {total} | {hits}/{total} ({hits / total:.1%}) | {worst:.3f} | "
              f"{exact_time:.1f} | {fast_time:.1f} |")


def one_layer(width: int, samples: int) -> dict:
    """Quantize one synthetic ReLU-fed layer of n = f = width; run in a fresh process."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((samples, width)).astype(np.float32)
                   @ (rng.standard_normal((width, width)).astype(np.float32) / np.sqrt(width)), 0)
    w = rng.standard_normal((width, width)) / np.sqrt(width)
    start = time.perf_counter()
    z = np.hstack([x.astype(np.float64), np.ones((samples, 1))])
    gram = (z.T @ z / samples)[:-1, :-1]
    del z, x
    problem = channel_problem(w, 1.0, "mse", gram)
    after_scales = time.perf_counter()
    choice = FastSolver().solve(problem, 0, QUIET)
    end = time.perf_counter()
    rtn = problem.energy(RoundToNearest().solve(problem))
    return {"width": width, "seconds": end - start, "solve_seconds": end - after_scales,
            "cost_ratio_to_rtn": problem.energy(choice) / rtn,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def part_sweep(widths: list[int], samples: int) -> None:
    print(f"\n### Width sweep: one n x f layer, 2 bits, clip-searched scales, fast, {samples:,} samples\n")
    print("| n = f | wall time (s) | of which fast (s) | fast cost / rtn cost | peak memory (MB) |")
    print("|---|---|---|---|---|")
    for width in widths:
        out = subprocess.run([sys.executable, __file__, "--one-layer", str(width), "--samples", str(samples)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.splitlines()[-1])
        print(f"| {width} | {r['seconds']:.1f} | {r['solve_seconds']:.1f} | {r['cost_ratio_to_rtn']:.3f} | "
              f"{r['peak_mb']:.0f} |")
    print("\n(Wall time from the Gram matrix of the samples to the solved rounding; peak memory is "
          "the whole process's, synthetic data included.)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=4, help="neurons per layer for the long neal runs")
    parser.add_argument("--instances", type=int, default=5, help="exact-solver instances per source")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 2048, 4096])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--one-layer", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_layer:
        print(json.dumps(one_layer(args.one_layer, args.samples)))
        return

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}. Command: `python benchmarks/solvers.py {' '.join(sys.argv[1:])}`".rstrip())
    for scale in ("minmax", "mse"):
        part_mnist(scale, args.sample)
    part_optimality(args.instances)
    if not args.skip_sweep:
        part_sweep(args.widths, args.samples)


if __name__ == "__main__":
    main()
