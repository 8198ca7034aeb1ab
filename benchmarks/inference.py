"""Inference speed, memory, size and error of each deployment form on a transformer-shaped model.

    pip install onnx-ir   # onnxruntime's MatMulNBitsQuantizer imports it
    python benchmarks/inference.py [--quick] [--reps 20] [--out benchmarks/results/inference.md]

The model: 4 x (MatMul 2048x2048 + Add), Relu between, input [batch, seq, 2048], seeded random
weights; calibration data random normal. Each row is one model file, timed at onnxruntime's
default level at 1 token ([1, 1, 2048]) and 512 tokens ([8, 64, 2048]), repetitions interleaved
across rows (the machine is shared; compare ratios within one run):

- ``float``;
- onnx-qubo (``QUBO_ROWS``: ``onnx_qubo.quantize`` with rtn/minmax scales, so the file is quick to
  make; the solver changes the codes, not the kernels), in the portable ``qdq`` format
  (DequantizeLinear -> Gemm) and in the ``ort`` format (MatMulNBits / MatMulIntegerToFloat);
- onnxruntime's own tools: ``MatMulNBitsQuantizer`` and ``quantize_static`` (QDQ, per channel).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    MatMulNBitsQuantizer,
)

import onnx_qubo

ROOT = Path(__file__).resolve().parent.parent
WIDTH, LAYERS = 2048, 4
QUBO: dict[str, Any] = {"solver": "rtn", "scale": "minmax"}
# label -> onnx_qubo.quantize keyword arguments (add format="ort" rows here)
QUBO_ROWS: list[tuple[str, dict[str, Any]]] = [
    ("onnx-qubo qdq w4 per channel", {"bits": 4}),
    ("onnx-qubo qdq w4 block 32", {"bits": 4, "granularity": "block", "block_size": 32}),
    ("onnx-qubo qdq w8a8 per channel", {"bits": 8, "activations": "int8"}),
    ("onnx-qubo qdq w2 per channel", {"bits": 2}),
    ("onnx-qubo ort w4 per channel (MatMulNBits)", {"bits": 4, "format": "ort"}),
    ("onnx-qubo ort w4 per channel, accuracy level 4", {"bits": 4, "format": "ort", "ort_accuracy_level": 4}),
    ("onnx-qubo ort w4 block 32 (MatMulNBits)", {"bits": 4, "granularity": "block", "block_size": 32,
                                                  "format": "ort"}),
    ("onnx-qubo ort w4 block 32, accuracy level 4", {"bits": 4, "granularity": "block", "block_size": 32,
                                                      "format": "ort", "ort_accuracy_level": 4}),
    ("onnx-qubo ort w8a8 per channel (MatMulIntegerToFloat)", {"bits": 8, "activations": "int8", "format": "ort"}),
    ("onnx-qubo ort w2 per channel (4-bit MatMulNBits, accuracy level 0)", {"bits": 2, "format": "ort",
                                                                            "ort_accuracy_level": 0}),
    ("onnx-qubo ort w2 per channel (2-bit MatMulNBits, accuracy level 4: auto)", {"bits": 2, "format": "ort"}),
    ("onnx-qubo ort w2 block 128 (2-bit MatMulNBits, accuracy level 4: auto)", {"bits": 2, "granularity": "block",
                                                                                 "block_size": 128, "format": "ort"}),
]
NBITS_BASELINE = "ORT MatMulNBitsQuantizer w4 block 32"


def float_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "input"
    for i in range(LAYERS):
        w = (rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        b = (rng.normal(size=WIDTH) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [current, f"W{i}"], [f"mm{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"fc{i}"], name=f"fc{i}_bias")]
        current = f"fc{i}"
        if i < LAYERS - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"]))
            current = f"relu{i}"
    shape: list[str | int] = ["batch", "seq", WIDTH]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class Reader(CalibrationDataReader):
    def __init__(self, data: np.ndarray):
        self.items = iter([{"input": data[i:i + 1]} for i in range(len(data))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


@dataclass
class Row:
    label: str
    path: Path
    session: ort.InferenceSession | None = None
    rss_mb: float = 0.0
    error: float = 0.0
    times: dict[str, list[float]] = field(default_factory=dict)


SESSION_MEMORY = """
import os, sys
import onnxruntime as ort

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
options = ort.SessionOptions()
options.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print((rss() - before) / 2**20)
"""


def session_mb(path: Path) -> float:
    """RSS growth while creating the session, in a fresh process (this one's heap is reused)."""
    result = subprocess.run([sys.executable, "-c", SESSION_MEMORY, str(path)], capture_output=True, text=True,
                            check=True)
    return float(result.stdout.split()[-1])


def build(workdir: Path, calib: np.ndarray) -> list[tuple[str, Path]]:
    model = float_model()
    paths = [("float", workdir / "float.onnx")]
    onnx.save(model, paths[0][1])
    for label, kwargs in QUBO_ROWS:
        path = workdir / f"qubo_{len(paths)}.onnx"
        onnx_qubo.run(paths[0][1], path, onnx_qubo.QuantizeConfig.from_flat({**QUBO, **kwargs}),
                      calibration={"input": calib}, evaluation={"input": calib[:2]}, speed=False)
        paths.append((label, path))
    for label, bits, block in ((NBITS_BASELINE, 4, 32), ("ORT MatMulNBitsQuantizer w2 block 128", 2, 128)):
        quantizer = MatMulNBitsQuantizer(onnx.load(paths[0][1]), algo_config=DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=True, bits=bits))
        quantizer.process()
        path = workdir / f"nbits{bits}.onnx"
        quantizer.model.save_model_to_file(str(path))
        paths.append((label, path))
    path = workdir / "static.onnx"
    quantize_static(str(paths[0][1]), str(path), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True)
    paths.append(("ORT quantize_static QDQ w8a8 per channel", path))
    return paths


def measure(paths: list[tuple[str, Path]], reps: int, seed: int = 1) -> list[Row]:
    rng = np.random.default_rng(seed)
    inputs = {"1": rng.normal(size=(1, 1, WIDTH)).astype(np.float32),
              "512": rng.normal(size=(8, 64, WIDTH)).astype(np.float32)}
    rows = [Row(label, path) for label, path in paths]
    for row in rows:
        row.rss_mb = session_mb(row.path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        row.session = ort.InferenceSession(str(row.path), options, providers=["CPUExecutionProvider"])
        row.times.update({k: [] for k in inputs})
    assert rows[0].session is not None
    reference = rows[0].session.run(None, {"input": inputs["512"]})[0]
    for row in rows:
        assert row.session is not None
        out = row.session.run(None, {"input": inputs["512"]})[0]  # also the warm-up
        row.error = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        row.session.run(None, {"input": inputs["1"]})
    for _ in range(reps):
        for key, x in inputs.items():
            for row in rows:
                assert row.session is not None
                start = time.perf_counter()
                row.session.run(None, {"input": x})
                row.times[key].append(time.perf_counter() - start)
    return rows


def table(rows: list[Row], reps: int, command: str, elapsed: float, load: tuple[float, float]) -> str:
    def med(row: Row, key: str) -> float:
        return float(np.median(row.times[key])) * 1e3

    base, nbits = rows[0], next(r for r in rows if r.label == NBITS_BASELINE)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [
        "# Inference: 4 x (MatMul 2048x2048 + Add), Relu between",
        "",
        (f"Machine: {cpu}, {os.cpu_count()} cores (shared), {platform.system()} {platform.release()}; "
         f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, default optimization level, default threads; "
         f"load average {load[0]:.1f} before, {load[1]:.1f} after (above the core count, single-token "
         "times are dominated by other processes; 512-token times are steadier)."),
        (f"Command: `{command}` ({elapsed:.0f} s). Latency: median of {reps} runs, repetitions interleaved "
         "across rows; 1 token = input [1, 1, 2048], 512 tokens = [8, 64, 2048]. Memory: RSS growth while "
         "creating the session. Error: relative L2 distance to the float model's output on the 512-token input."),
        "",
        ("| model | 1 token (ms) | x float | x MatMulNBitsQuantizer | 512 tokens (ms) | x float | "
         "x MatMulNBitsQuantizer | session MB | file MB | error vs float |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {med(r, '1'):.2f} | {med(r, '1') / med(base, '1'):.2f} | "
            f"{med(r, '1') / med(nbits, '1'):.2f} | {med(r, '512'):.1f} | {med(r, '512') / med(base, '512'):.2f} | "
            f"{med(r, '512') / med(nbits, '512'):.2f} | {r.rss_mb:.0f} | {r.path.stat().st_size / 2**20:.1f} | "
            f"{r.error:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5 repetitions")
    parser.add_argument("--calib", type=int, default=16, help="calibration sequences of 16 tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference.md")
    args = parser.parse_args()
    reps = 5 if args.quick else args.reps
    start, load = time.perf_counter(), os.getloadavg()[0]
    calib = np.random.default_rng(2).normal(size=(args.calib, 16, WIDTH)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), calib)
        rows = measure(paths, reps)
        command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
        text = table(rows, reps, command, time.perf_counter() - start, (load, os.getloadavg()[0]))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
