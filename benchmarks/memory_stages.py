"""Where a quantization run's memory peaks: run ``onnx_qubo.quantize`` in this process while a
thread samples the resident set every 0.1 s and keeps, per innermost chain of onnx_qubo
functions on the main thread, the largest RSS it saw.

    python benchmarks/memory_stages.py MODEL.onnx DATA.npz [--bits 4] [--top 12]
    python benchmarks/memory_stages.py genai_fp32/model.onnx calib64x256.npz --eval eval16x256.npz --no-speed \
        --set granularity=block --set block_size=32 --set format=ort --set ort_accuracy_level=4 --set embeddings=true

DATA.npz serves as calibration and evaluation data (speed check on), as ``real_models.py``'s
onnx-qubo configs run, unless ``--eval`` names the evaluation data; ``--set NAME=VALUE`` sets any
config option (flat names, values as JSON where they parse, else strings). Samples, not VmHWM:
a peak shorter than 0.1 s can be missed (the process's VmHWM is printed too). Linux only (reads
/proc/self/status).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import onnx_qubo


def status_gb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in GB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e6
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--top", type=int, default=12, help="stages listed, largest peak first")
    parser.add_argument("--eval", type=Path, help="evaluation data (default: DATA)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a config option")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed check")
    args = parser.parse_args()
    options: dict[str, object] = {"bits": args.bits}
    for item in args.set:
        name, _, text = item.partition("=")
        try:
            options[name] = json.loads(text)
        except json.JSONDecodeError:
            options[name] = text
    peaks: collections.Counter[str] = collections.Counter()
    main_thread, done = threading.get_ident(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            frame = sys._current_frames().get(main_thread)
            chain = [f.name for f in traceback.extract_stack(frame) if "onnx_qubo" in f.filename][-3:]
            key = " > ".join(chain) or "(outside onnx_qubo)"
            peaks[key] = max(peaks[key], status_gb("VmRSS"))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        onnx_qubo.run(args.model, Path(folder) / "out.onnx", onnx_qubo.QuantizeConfig.from_flat(options),
                      calibration=args.data, evaluation=args.eval or args.data, progress=False,
                      speed=not args.no_speed)
    done.set()
    sampler.join()
    print(f"{args.model.name}, {options}, data {args.data.name}: {time.perf_counter() - start:.0f} s, "
          f"VmHWM {status_gb('VmHWM'):.2f} GB\n")
    print("| peak RSS (GB) | innermost onnx_qubo functions |\n|---|---|")
    for key, value in peaks.most_common(args.top):
        print(f"| {value:.2f} | {key} |")


if __name__ == "__main__":
    main()
