"""What measuring the samples' spread (``--damping auto``, calibration/spread.py) adds to a
calibration: the same model and data calibrated with and without it, alternately, ``--repeats``
times each, every layer's statistics gathered and unpacked; the table gives the median times and
their ratio, with the load average (the machine is shared).

    python benchmarks/spread_cost.py MODEL.onnx CALIB.npz [--repeats 3] [--batch-size N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.progress import Progress
from onnx_qubo.graph.files import load_model
from onnx_qubo.pipeline import calibrate, prepare


def calibration_seconds(model_path: Path, calib: Path, spread: bool, batch_size: int) -> float:
    """One calibration of every layer (all passes over the data, each view unpacked once)."""
    model = prepare(load_model(model_path))
    data = load_dataset(calib, model, batch_size)
    start = time.perf_counter()
    calibrated = calibrate(model, data, Progress(), spread=spread)
    for key in dict.fromkeys(layer.statistics_key for layer in calibrated.layers):
        calibrated.statistics[key]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=QuantizeConfig().execution.batch_size)
    args = parser.parse_args()
    seconds: dict[bool, list[float]] = {False: [], True: []}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for spread in (False, True):
            seconds[spread].append(calibration_seconds(args.model, args.calib, spread, args.batch_size))
            loads.append(os.getloadavg()[0])
    without, with_spread = (statistics.median(seconds[s]) for s in (False, True))
    print(f"Command: `python benchmarks/spread_cost.py {args.model.name} {args.calib.name} --repeats {args.repeats} "
          f"--batch-size {args.batch_size}`; {os.cpu_count()} cores, 1-minute load average "
          f"{min(loads):.2f}-{max(loads):.2f}\n")
    print("| calibration | median s | runs (s) |\n|---|---|---|")
    for spread, median in ((False, without), (True, with_spread)):
        runs = ", ".join(f"{s:.1f}" for s in seconds[spread])
        print(f"| {'with the spread (damping auto)' if spread else 'without (any other damping)'} | {median:.1f} | "
              f"{runs} |")
    print(f"\nWith the spread / without: {with_spread / without:.2f}x")


if __name__ == "__main__":
    main()
