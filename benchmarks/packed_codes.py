"""What packing codes at their own width (``--pack-codes``, onnx_qubo/passes/packed_codes.py) costs
and saves: the model quantized with and without it (the same codes), then per file its size, the
bits per weight of its quantized layers (as benchmarks/curves.py counts them), and, each in a fresh
process ``--repeats`` times, the seconds onnxruntime takes to load it, the process's peak resident
memory while loading (VmHWM), its resident memory after loading and after glibc's ``malloc_trim``
(freed memory the process keeps; Linux), at the default and basic levels and with optimizations
disabled (where nothing is folded), and the median latency of one batch. The outputs of the two files are
compared too (they must be the same bits). The machine is shared: the load average is printed.

    python benchmarks/packed_codes.py MODEL.onnx CALIB.npz [--bits 3] [--set NAME=VALUE ...] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from curves import bits_per_weight

from onnx_qubo import api
from onnx_qubo.config import QuantizeConfig

LOAD = """
import ctypes, json, sys, time
import numpy as np, onnxruntime as ort
path, level, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def status(field):  # VmHWM: this process's peak (ru_maxrss keeps the parent's across exec); VmRSS: now
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(field + ":")) / 1e3


options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel(level)
start = time.perf_counter()
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
loaded = time.perf_counter() - start
peak, resident = status("VmHWM"), status("VmRSS")
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what of it the process holds freed (glibc keeps freed heap)
trimmed = status("VmRSS")
feed = dict(np.load(batch))
session.run(None, feed)
times = []
for _ in range(5):
    start = time.perf_counter()
    outputs = session.run(None, feed)
    times.append(time.perf_counter() - start)
np.save(batch + ".out.npy", np.asarray(outputs[0], np.float64))
print(json.dumps({"load_s": loaded, "peak_mb": peak, "resident_mb": resident, "trimmed_mb": trimmed,
                  "run_ms": 1e3 * sorted(times)[2]}))
"""
LEVELS = {"default": 99, "basic": 1, "disabled": 0}  # onnxruntime's GraphOptimizationLevel values


def measured(path: Path, level: int, batch: Path, repeats: int) -> dict[str, float]:
    """Medians over ``repeats`` fresh processes loading ``path`` at ``level`` and running ``batch``."""
    runs = [json.loads(subprocess.run([sys.executable, "-c", LOAD, str(path), str(level), str(batch)], check=True,
                                      capture_output=True, text=True).stdout) for _ in range(repeats)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="any config option (flat name; the value as JSON where it parses)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    options: dict[str, object] = {"bits": args.bits}
    for item in args.set:
        name, value = item.split("=", 1)
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        arrays = dict(np.load(args.calib))
        batch = work / "batch.npz"
        np.savez(batch, **{name: value[:1] for name, value in arrays.items()})
        rows = {}
        for packed in (True, False):
            path = work / f"{'packed' if packed else 'plain'}.onnx"
            config = QuantizeConfig.from_flat(dict(options, pack_codes=packed))
            api.run(str(args.model), str(path), config, calibration=str(args.calib), speed=False)
            bpw, _ = bits_per_weight(path)
            rows[packed] = {"bytes": path.stat().st_size, "bits_per_weight": bpw}
            for name, level in LEVELS.items():
                rows[packed][name] = measured(path, level, batch, args.repeats)
                rows[packed][f"{name}_output"] = np.load(str(batch) + ".out.npy")
            loads.append(os.getloadavg()[0])
    same = all(np.array_equal(rows[True][f"{name}_output"], rows[False][f"{name}_output"]) for name in LEVELS)
    flags = "".join(f" --set {item}" for item in args.set)
    print(f"Command: `python benchmarks/packed_codes.py {args.model.name} {args.calib.name} --bits {args.bits}"
          f"{flags} --repeats {args.repeats}`; {os.cpu_count()} cores, 1-minute load average "
          f"{min(loads):.2f}-{max(loads):.2f}; outputs of the two files the same bits at every level: {same}\n")
    print("| file | bytes | bits per weight | level | load s | peak MB in loading | resident MB after it | "
          "after malloc_trim | batch-1 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for packed in (False, True):
        row = rows[packed]
        for name in LEVELS:
            got = row[name]
            print(f"| {'--pack-codes' if packed else '--no-pack-codes'} | {row['bytes']:,} | "
                  f"{row['bits_per_weight']:.3f} | {name} | {got['load_s']:.3f} | {got['peak_mb']:.0f} | "
                  f"{got['resident_mb']:.0f} | {got['trimmed_mb']:.0f} | {got['run_ms']:.2f} |")


if __name__ == "__main__":
    main()
