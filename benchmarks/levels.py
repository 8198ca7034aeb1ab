# ruff: noqa: E501  (long table and command lines)
"""More than two levels per weight (``--levels``, issue 19): one CLI run per (bits, levels, extra
flags), the report's layer costs, task metric and time side by side.

    python benchmarks/levels.py models/digits_mlp.onnx --bits 2 3 --levels 2 3 4 --out benchmarks/results/levels_digits.md
    python benchmarks/levels.py /path/genai_fp32/model.onnx --calib C.npz --eval E.npz --bits 3 --levels 2 4 \\
        --flags "--granularity block --block-size 32 --rotate hadamard --format ort --ort-accuracy-level 4 --embeddings" \\
        --work /tmp/levels_lm --out benchmarks/results/levels_lm.md

Each run is ``python -m onnx_qubo quantize MODEL OUT --bits B --levels L FLAGS --report R --no-speed
--quiet`` (its exact command is in the table); a run whose report is already in ``--work`` is not
redone (``--redo`` forces it), so long runs can be made one at a time. The metric is the report's
perplexity (language models), else accuracy, else top-1 agreement with the float model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_one(model: Path, work: Path, bits: int, levels: int, flags: list[str], calib: str | None,
            evaluation: str | None, redo: bool) -> dict[str, Any]:
    tag = f"b{bits}_lv{levels}"
    report = work / f"{tag}.report.json"
    command = [sys.executable, "-m", "onnx_qubo", "quantize", str(model), str(work / tag / "model.onnx"),
               "--bits", str(bits), "--levels", str(levels), *flags, "--report", str(report), "--no-speed", "--quiet"]
    command += ["--calib", calib] if calib else []
    command += ["--eval", evaluation] if evaluation else []
    if redo or not report.exists():
        (work / tag).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run(command, check=True, env=env)
        (work / f"{tag}.seconds").write_text(f"{time.perf_counter() - start:.1f}\n")
    seconds_file = work / f"{tag}.seconds"
    data = json.loads(report.read_text())
    return {"bits": bits, "levels": levels, "command": shlex.join(["onnx-qubo", *command[3:]]),
            "seconds": float(seconds_file.read_text()) if seconds_file.exists() else data.get("seconds"),
            "cost_rtn": sum(layer["cost_rtn"] for layer in data["layers"]),
            "cost_solved": sum(layer["cost_solved"] for layer in data["layers"]),
            "metric": metric(data["evaluation"])}


def metric(evaluation: dict[str, Any]) -> tuple[str, float, float | None]:
    """(name, quantized, float) of the report's task metric."""
    if evaluation.get("quantized_perplexity") is not None:
        return "perplexity", evaluation["quantized_perplexity"], evaluation["float_perplexity"]
    if evaluation.get("quantized_accuracy") is not None:
        return "accuracy", evaluation["quantized_accuracy"], evaluation.get("float_accuracy")
    return "top-1 agreement", evaluation["top1_agreement"], None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--flags", default="", help="more quantize flags, one string")
    parser.add_argument("--calib")
    parser.add_argument("--eval")
    parser.add_argument("--work", type=Path, default=Path("levels_work"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--redo", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run_one(args.model, args.work, bits, levels, shlex.split(args.flags), args.calib, args.eval, args.redo)
            for bits in args.bits for levels in args.levels]
    name = rows[0]["metric"][0]
    lines = [f"# `--levels` on {args.model.name}", "",
             f"Command: `python benchmarks/levels.py {shlex.join(sys.argv[1:])}`  ",
             f"Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; machine: {platform.machine()}, {os.cpu_count()} cores "
             f"(shared; load average {os.getloadavg()[0]:.1f} at the end); time is the run's wall clock", "",
             "Cost: the sum over layers of the QUBO energy (mean squared output error on the calibration data) "
             f"of round-to-nearest and of the solved rounding. {name}: on the evaluation data"
             + (f" (float {rows[0]['metric'][2]:.4g})." if rows[0]["metric"][2] is not None else "."), "",
             f"| bits | levels | cost RTN | cost solved | solved / levels 2 | {name} | time (s) | command |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        two = next((r for r in rows if r["bits"] == row["bits"] and r["levels"] == 2), None)
        ratio = f"{row['cost_solved'] / two['cost_solved']:.4f}" if two else ""
        lines.append(f"| {row['bits']} | {row['levels']} | {row['cost_rtn']:.5g} | {row['cost_solved']:.5g} | {ratio} "
                     f"| {row['metric'][1]:.4g} | {row['seconds']:.0f} | `{row['command']}` |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
