"""Reproduce the paper's study on the shipped models: accuracy from int8 to int1 for
round-to-nearest and QUBO rounding with max-abs and searched scales, the cost-accuracy
correlation per bit width, plots, and the paper's qualitative findings checked one by one.

    pip install -e ".[plot]" && python benchmarks/paper_table.py      (about 5 minutes)

Writes benchmarks/results/<model>.md, <model>.json and <model>_*.png, and prints the Markdown
that the README quotes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

import onnx_qubo
from onnx_qubo.studies.plots import write_plots

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def accuracy(comparison, bits, scale, solver) -> float:
    return next(r.accuracy for r in comparison.rows if (r.bits, r.scale, r.solver) == (bits, scale, solver))


def findings(c) -> list[str]:
    """The paper's claims, each checked on this comparison."""
    out = []
    gain2 = accuracy(c, 2, "minmax", "fast") - accuracy(c, 2, "minmax", "rtn")
    out.append(f"QUBO rounding beats round-to-nearest at int2 by a wide margin with max-abs scales: "
               f"{'yes' if gain2 >= 0.10 else 'NO'} ({gain2 * 100:+.1f} points)")
    gain8 = max(abs(accuracy(c, 8, s, "fast") - accuracy(c, 8, s, "rtn")) for s in ("minmax", "mse"))
    out.append(f"No real difference at int8 (under 0.5 points with either scale): "
               f"{'yes' if gain8 < 0.005 else 'NO'} (largest difference {gain8 * 100:.2f} points)")
    int1 = max(accuracy(c, 1, s, m) for s in ("minmax", "mse") for m in ("rtn", "fast"))
    out.append(f"Collapse at int1 (best configuration under 50% {c.metric}): "
               f"{'yes' if int1 < 0.5 else 'NO'} (best {int1:.1%})")
    r = c.correlations()
    if r.get(2) is not None and r.get(8) is not None:
        out.append(f"QUBO cost correlates linearly (negatively) with accuracy at int2, much more than at int8: "
                   f"{'yes' if r[2] < -0.8 and abs(r[2]) > abs(r[8]) else 'NO'} "
                   f"(Pearson r {r[2]:+.3f} at int2, {r[8]:+.3f} at int8)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mnist_mlp", "digits_mlp"])
    parser.add_argument("--samples", type=int, default=30)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}. Command: `python benchmarks/paper_table.py {' '.join(sys.argv[1:])}`".rstrip())
    for name in args.models:
        comparison = onnx_qubo.compare(ROOT / "models" / f"{name}.onnx", bits=(8, 4, 3, 2, 1),
                                       scales=("minmax", "mse"), solvers=("rtn", "fast"),
                                       samples=args.samples, symmetric=True,
                                       bias_correction=False)  # the paper's scheme
        (RESULTS / f"{name}.md").write_text(comparison.to_markdown() + "\n")
        (RESULTS / f"{name}.json").write_text(comparison.to_json())
        plots = write_plots(comparison, RESULTS)
        for plot in plots:
            plot.rename(RESULTS / f"{name}_{plot.name}")
        print(f"\n### {name}\n\n{comparison.to_markdown()}\n")
        for line in findings(comparison):
            print(f"- {line}")


if __name__ == "__main__":
    main()
