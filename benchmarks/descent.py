"""The fast solver against an earlier version of itself, on one wide layer, in one process.

    python benchmarks/descent.py                       # 4096x4096, 2 bits, old = HEAD's fast.py
    python benchmarks/descent.py --old 82967ee --rows 1024 --bits 2 4 --repeats 3

The machine is shared, so absolute times drift with its load: the two solvers run on the same
``LayerProblem`` (built once, as ``benchmarks/scale.py run`` builds it: seeded Gemm weights,
correlated inputs, ``--scale mse``), alternating old, new, old, new..., and the table gives each
run's wall and CPU seconds (CPU: this process, every thread) and the new / old ratios of their
medians. ``--rows`` solves the first rows only (a quicker, proportional measure). The old
solver is the file ``onnx_qubo/solvers/fast.py`` at git revision ``--old``, imported beside the
current one; both solve with default parameters and seed 0. Costs are exact (float64) layer
energies over round-to-nearest's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from scale import correlated_inputs  # noqa: E402

from onnx_qubo.core.grid import Scheme  # noqa: E402
from onnx_qubo.rounding.qubo import LayerProblem, build_problem  # noqa: E402
from onnx_qubo.rounding.scales import choose_scales  # noqa: E402
from onnx_qubo.rounding.solvers import RoundToNearest  # noqa: E402
from onnx_qubo.rounding.solvers import fast as new_fast  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def old_module(revision: str) -> ModuleType:
    """``onnx_qubo/solvers/fast.py`` at ``revision``, imported as a sibling of the current one."""
    source = subprocess.run(["git", "show", f"{revision}:onnx_qubo/solvers/fast.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    name = "onnx_qubo.rounding.solvers._fast_" + revision.replace("/", "_").replace("~", "_").replace("^", "_")
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "onnx_qubo.rounding.solvers"
    sys.modules[name] = module
    exec(compile(source, f"{revision}:fast.py", "exec"), module.__dict__)
    return module


def layer_problem(width: int, samples: int, bits: int, rows: int | None) -> LayerProblem:
    """scale.py's layer (weights seeded 0, inputs seeded 1) with its mse scales, first ``rows`` rows."""
    x = correlated_inputs(samples, width).astype(np.float64)
    w = np.random.default_rng(0).standard_normal((width, width)) / np.sqrt(width)
    gram = x.T @ x / samples
    scheme = Scheme(bits)
    scale = choose_scales("mse", w, scheme, gram).scale
    rows = rows or width
    return build_problem(w[:rows], scale[:rows], 0, 1.0, scheme.grid, gram)


def timed(solver, problem: LayerProblem) -> tuple[np.ndarray, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    choice = solver.solve(problem, 0)
    return choice, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="HEAD", help="git revision of the old fast.py (default HEAD)")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=None, help="solve only the first rows (default all)")
    parser.add_argument("--samples", type=int, default=1536)
    parser.add_argument("--bits", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    old = old_module(args.old)
    print(f"{os.cpu_count()} cores, numpy {np.__version__}; old = fast.py at {args.old}; "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| bits | rows | run | solver | wall (s) | CPU (s) | solved / rtn |")
    print("|---|---|---|---|---|---|---|")
    for bits in args.bits:
        problem = layer_problem(args.width, args.samples, bits, args.rows)
        rtn = problem.energy(RoundToNearest().solve(problem))
        times: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        costs = {}
        for run in range(args.repeats):
            for label, module in (("old", old), ("new", new_fast)):
                choice, wall, cpu = timed(module.FastSolver(), problem)
                times[label].append((wall, cpu))
                costs[label] = problem.energy(choice) / rtn
                print(f"| {bits} | {problem.shape[0]} | {run + 1} | {label} | {wall:.1f} | {cpu:.1f} | "
                      f"{costs[label]:.5f} |", flush=True)
        old_t, new_t = (np.median(np.array(times[k]), axis=0) for k in ("old", "new"))
        print(f"\n{bits} bits: new / old median wall {new_t[0] / old_t[0]:.2f}, CPU {new_t[1] / old_t[1]:.2f}; "
              f"solved / rtn old {costs['old']:.5f}, new {costs['new']:.5f}; "
              f"load average {os.getloadavg()[0]:.2f}\n")


if __name__ == "__main__":
    main()
