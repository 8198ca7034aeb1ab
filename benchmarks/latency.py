# ruff: noqa: E501  (long table lines)
"""Latency of model files on the same inputs, timed interleaved in one run (the machine is shared:
compare the ratios to the first file, not the milliseconds across runs).

    python benchmarks/latency.py --inputs calib.npz [--batches 1,16] [--repeat 20] [--threads 0] \\
        [--rotated whole,whole+convs] float.onnx quantized.onnx ...

``--rotated``: also time the first file rotated by onnx-qubo's ``--rotate`` pass (``hadamard`` or
``whole``, ``+convs``: ``--rotate-convs``; the float model with its online transforms, no
quantization), the cost of the transforms alone.

Every file gets one onnxruntime session at the default level (CPU; ``--threads`` intra-op
threads, 0: onnxruntime's choice); each round runs every file once per batch size, in turn, after
one warm-up run each; the table gives the median over ``--repeat`` rounds and its ratio to the
first file's, with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_qubo.core.options import Rotation
from onnx_qubo.model.rotation import rotate


def session(model: Path | bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def rotated(path: Path, how: str) -> bytes:
    """The float model at ``path`` rotated as ``--rotate`` (``whole+convs``: with ``--rotate-convs``)."""
    rotation, _, convs = how.partition("+")
    return rotate(onnx.load(path), Rotation(rotation), 64, 0, convs == "convs").SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--inputs", type=Path, required=True, help=".npz keyed by the models' input names")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rotated", default="", help="comma-separated: hadamard, whole, whole+convs, ...")
    args = ap.parse_args()
    data = dict(np.load(args.inputs))
    batches = [int(b) for b in args.batches.split(",")]
    hows = [h for h in args.rotated.split(",") if h]
    names = [path.name for path in args.models] + [f"{args.models[0].name} rotated ({h})" for h in hows]
    sessions = [session(path, args.threads) for path in args.models]
    sessions += [session(rotated(args.models[0], h), args.threads) for h in hows]
    feeds = {b: {name: value[:b] for name, value in data.items()} for b in batches}
    load_before = os.getloadavg()
    times: dict[tuple[int, int], list[float]] = {(i, b): [] for i in range(len(sessions)) for b in batches}
    for s, b in ((s, b) for s in sessions for b in batches):  # warm-up
        s.run(None, feeds[b])
    for _ in range(args.repeat):
        for b in batches:
            for i, s in enumerate(sessions):
                start = time.perf_counter()
                s.run(None, feeds[b])
                times[i, b].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    print(f"Command: `python benchmarks/latency.py --inputs {args.inputs} --batches {args.batches} "
          f"--repeat {args.repeat} --threads {args.threads}{' --rotated ' + args.rotated if hows else ''} "
          f"{' '.join(map(str, args.models))}`  ")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after  ")
    print(f"Median of {args.repeat} interleaved rounds, onnxruntime's default level, milliseconds (ratio to the first file)\n")
    print("| model | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    first = {b: statistics.median(times[0, b]) for b in batches}
    for i, name in enumerate(names):
        cells = []
        for b in batches:
            median = statistics.median(times[i, b])
            cells.append(f"{1e3 * median:.2f} ({median / first[b]:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
