"""The portable (``--format qdq``) file at float speed: onnxruntime's ``session.disable_quant_qdq``.

onnxruntime keeps a weight's ``DequantizeLinear`` out of constant folding so that its QDQ fusions can
see it, so a weight-only QDQ model dequantizes every weight on every run (slower than float at small
batches, the README's report). With the session option ``session.disable_quant_qdq`` set to ``1``
those fusions are off and constant folding dequantizes the weights once, when the session is made:
the file stays small, the session holds float weights and runs at float speed. This script
measures, for pairs of float and quantized models, the latency at batch 1 and at a larger batch
(medians, rounds interleaved across the three sessions), the resident memory a fresh process gains
by making each session, and how far the folded session's output is from the quantized model run
with optimizations disabled (the independent reference the tool checks its forms against).

    python benchmarks/qdq_folded.py [--pair FLOAT.onnx QUANTIZED.onnx DATA.npz ...] [--batch 64]

Without ``--pair``: the shipped demo models (models/mnist_mlp.onnx, models/mnist_cnn.onnx) quantized
here at 4 bits per channel, portable form, default flags, into a temporary folder. Weight-only
models only: with ``--activations`` the option also turns off the fusions into integer kernels.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
OPTION = "session.disable_quant_qdq"


def session(path: Path, folded: bool = False, level: ort.GraphOptimizationLevel | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if folded:
        so.add_session_config_entry(OPTION, "1")
    if level is not None:
        so.graph_optimization_level = level
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def session_memory(path: Path, folded: bool) -> float:
    """MB of resident memory a fresh process gains by making the session (and running it once)."""
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
        "before = rss()\n"
        "so = ort.SessionOptions()\n"
        f"if {folded}: so.add_session_config_entry('{OPTION}', '1')\n"
        "s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])\n"
        "print((rss() - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def latency(sessions: list[ort.InferenceSession], feeds: dict[str, np.ndarray], rounds: int) -> list[float]:
    """Median ms per run of each session, rounds (of about 0.2 s of the slowest session) interleaved."""
    times: list[list[float]] = [[] for _ in sessions]
    slowest = 0.0
    for s in sessions:
        s.run(None, feeds)
        start = time.perf_counter()
        s.run(None, feeds)
        slowest = max(slowest, time.perf_counter() - start)
    runs = max(3, int(0.2 / max(slowest, 1e-6)))
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            for _ in range(runs):
                s.run(None, feeds)
            times[i].append((time.perf_counter() - start) / runs * 1000)
    return [float(np.median(t)) for t in times]


def demo_pairs(folder: Path) -> list[tuple[Path, Path, Path]]:
    sys.path.insert(0, str(ROOT))
    from onnx_qubo import api
    from onnx_qubo.config import QuantizeConfig

    pairs = []
    for name in ("mnist_mlp", "mnist_cnn"):
        model, calib = ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}.calib.npz"
        out = folder / f"{name}_int4.onnx"
        api.run(model, out, QuantizeConfig.from_flat({"bits": 4}), calibration=dict(np.load(calib)), speed=False)
        pairs.append((model, out, ROOT / "models" / f"{name}.eval.npz"))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pair", nargs=3, action="append", type=Path, metavar=("FLOAT", "QUANTIZED", "DATA"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        pairs = args.pair or demo_pairs(Path(tmp))
        lines = [f"# {(__doc__ or '').splitlines()[0]}", "",
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores "
                 f"(shared; load {load:.2f} before), onnxruntime {ort.__version__}, default level and threads. "
                 f"Command: `python benchmarks/qdq_folded.py {' '.join(sys.argv[1:])}`", "",
                 "| model | batch | float (ms) | qdq (ms) | qdq folded (ms) | folded / float | session MB: float, qdq, "
                 "folded | file MB: float, qdq | folded vs unoptimized qdq |", "|---|---|---|---|---|---|---|---|---|"]
        for float_path, quantized, data in pairs:
            arrays = np.load(data)
            plain = session(float_path)
            names = [i.name for i in plain.get_inputs()]
            folded = session(quantized, folded=True)
            reference = session(quantized, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            full = {name: arrays[name][:args.batch] for name in names}
            got, want = folded.run(None, full)[0], reference.run(None, full)[0]
            difference = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            memory = [session_memory(float_path, False), session_memory(quantized, False),
                      session_memory(quantized, True)]
            sizes = [float_path.stat().st_size / 1e6, quantized.stat().st_size / 1e6]
            for batch in (1, args.batch):
                feeds = {name: arrays[name][:batch] for name in names}
                f, q, fq = latency([plain, session(quantized), folded], feeds, args.rounds)
                lines.append(f"| {float_path.name} | {batch} | {f:.3f} | {q:.3f} | {fq:.3f} | {fq / f:.2f} | "
                             f"{memory[0]:.0f}, {memory[1]:.0f}, {memory[2]:.0f} | {sizes[0]:.2f}, {sizes[1]:.2f} | "
                             f"{difference:.1e} |")
            print("\n".join(lines[-2:]), flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
