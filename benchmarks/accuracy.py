"""Accuracy of the quantized demo model for each bit width x scale x solver, as a Markdown table.

    python benchmarks/accuracy.py                       # the README's table (neal included: ~2 min)
    python benchmarks/accuracy.py --solvers rtn fast    # quicker

Every row is a real run of ``onnx_qubo.quantize`` (written model evaluated in onnxruntime with
default session options) on the 10,000 MNIST test images shipped beside the model, every layer at
the row's width (``head_bits`` set to it) and calibrated on the float model's inputs
(``sequential`` off, on by default for a Conv network): the solvers compared on the paper's
setting, the last layer included.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

import onnx_qubo
from onnx_qubo.rounding.solvers import SOLVERS

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    import os
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, numpy {np.__version__}, onnxruntime {onnxruntime.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "mnist_mlp.onnx"))
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--scales", nargs="+", default=["minmax", "mse"])
    parser.add_argument("--solvers", nargs="+", default=["rtn", "neal", "fast"], choices=list(SOLVERS))
    parser.add_argument("--neal-bits", type=int, nargs="+", default=[2],
                        help="bit widths at which neal runs (it is slow)")
    args = parser.parse_args()

    rows = []
    float_accuracy = None
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            for scale in args.scales:
                for solver in args.solvers:
                    if solver == "neal" and bits not in args.neal_bits:
                        continue
                    start = time.perf_counter()
                    config = onnx_qubo.QuantizeConfig.from_flat(bits=bits, head_bits=bits, scale=scale, solver=solver,
                                                                sequential=False)
                    report = onnx_qubo.run(args.model, Path(tmp) / "q.onnx", config).report
                    elapsed = time.perf_counter() - start
                    ev = report.evaluation
                    float_accuracy = ev.float_accuracy
                    rows.append((bits, scale, solver, ev.quantized_accuracy, ev.top1_agreement,
                                 sum(layer.final_cost for layer in report.layers),
                                 sum(layer.solve_seconds for layer in report.layers), elapsed,
                                 ev.default_matches_basic))
                    print(f"done: {bits} bits, {scale}, {solver}", file=sys.stderr)

    print(f"Model `{Path(args.model).name}`, float accuracy {float_accuracy:.2%} "
          f"(onnxruntime, {report.evaluation.samples} test images).\n")
    print("| bits | scale | solver | accuracy | drop (points) | top-1 agreement | total QUBO cost | "
          "solve time (s) | run time (s) | default = basic level |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bits, scale, solver, acc, agree, cost, solve, total, same in rows:
        print(f"| {bits} | {scale} | {solver} | {acc:.2%} | {(acc - float_accuracy) * 100:+.2f} | {agree:.2%} | "
              f"{cost:.4g} | {solve:.2f} | {total:.1f} | {'yes' if same else 'NO'} |")
    print(f"\nMachine: {machine()}.")
    print(f"Command: `python benchmarks/accuracy.py {' '.join(sys.argv[1:])}`".rstrip())


if __name__ == "__main__":
    main()
