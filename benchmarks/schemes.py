"""Quantization schemes on the demo model: accuracy tables, and a side-by-side comparison with
onnxruntime's own static quantizer.

    python benchmarks/schemes.py > benchmarks/results/schemes.md      # about 5 minutes on 2 cores

1. Every granularity (tensor, channel, blocks of 32 inputs) x zero point (symmetric INT,
   asymmetric UINT with zero points) x bit width (2, 4, 8), weights only, clip-searched
   scales: each written model passes ``onnx.checker`` (full check) and runs in onnxruntime;
   accuracy after round-to-nearest and after QUBO rounding (fast) on the same scales.
2. Options at 2 bits: bias correction, sequential calibration, scale search on the solved
   cost, and the quantized bias of the paper (``--bias quantize``, max-abs scales, neal).
3. Quantized activations at 4-bit per-channel weights: onnxruntime's ``quantize_static``
   (QDQ, per channel, QInt4 weights, QUInt8 activations, MinMax calibration) against
   ``--activations int8|uint8``, on the same model and calibration data.

Every row is a real run: the quantized model is written, checked and evaluated with
onnxruntime's default session options on the 10,000 test images shipped beside the model.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import onnx_qubo

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "mnist_mlp.onnx"
GRANULARITIES = {"tensor": {"granularity": "tensor"}, "channel": {},
                 "block 32": {"granularity": "block", "block_size": 32}}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, numpy {np.__version__}, onnxruntime {onnxruntime.__version__}")


class Runner:
    """Quantizes the model with given options, checks the written file, returns the report."""

    def __init__(self, model: Path, workdir: Path):
        self.model, self.out = model, workdir / "q.onnx"

    def __call__(self, **options) -> tuple[onnx_qubo.Report, float]:
        start = time.perf_counter()
        report = onnx_qubo.run(self.model, self.out, onnx_qubo.QuantizeConfig.from_flat(options)).report
        onnx.checker.check_model(onnx.load(self.out), full_check=True)  # raises if invalid
        assert report.evaluation.default_matches_basic, options
        print(f"done: {options}", file=sys.stderr)
        return report, time.perf_counter() - start


def drop(report) -> str:
    ev = report.evaluation
    return f"{(ev.quantized_accuracy - ev.float_accuracy) * 100:+.2f}"


def part_matrix(run: Runner) -> None:
    print("\n### Granularity x zero point x bits (weights only, `--scale mse`)\n")
    print("Every model below passed `onnx.checker.check_model(full_check=True)` and ran in onnxruntime "
          "with the same predictions at the default and the basic optimization level.\n")
    print("| granularity | zero point | bits | storage | rtn accuracy | QUBO (fast) accuracy | drop (points) | "
          "QUBO cost / rtn cost | size (bytes) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bits in (2, 4, 8):
        for name, granularity in GRANULARITIES.items():
            for symmetric in (True, False):
                options = dict(bits=bits, symmetric=symmetric, **granularity)
                rtn, _ = run(solver="rtn", **options)
                fast, _ = run(solver="fast", **options)
                cost = sum(layer.cost_solved for layer in fast.layers)
                rtn_cost = sum(layer.cost_rtn for layer in fast.layers)
                print(f"| {name} | {'symmetric' if symmetric else 'asymmetric'} | {bits} | {fast.layers[0].storage} | "
                      f"{rtn.evaluation.quantized_accuracy:.2%} | {fast.evaluation.quantized_accuracy:.2%} | "
                      f"{drop(fast)} | {cost / rtn_cost:.3f} | {fast.output_bytes:,} |")


def part_options(run: Runner) -> None:
    print("\n### Options (symmetric, per channel)\n")
    print("| bits | options | accuracy | drop (points) | top-1 agreement | total QUBO cost | run time (s) |")
    print("|---|---|---|---|---|---|---|")
    rows = [
        (2, "(default: `--scale mse --solver fast`)", {}),
        (2, "`--bias-correction`", dict(bias_correction=True)),
        (2, "`--sequential`", dict(sequential=True)),
        (2, "`--scale qubo`", dict(scale="qubo")),
        (2, "`--bias quantize`", dict(bias="quantize")),
        (2, "`--scale minmax --solver neal` (the paper, float bias)", dict(scale="minmax", solver="neal")),
        (2, "`--bias quantize --scale minmax --solver neal` (the paper's setting)",
         dict(bias="quantize", scale="minmax", solver="neal")),
        (2, "`--bias quantize --scale minmax --solver fast`", dict(bias="quantize", scale="minmax")),
        (4, "(default)", {}),
        (4, "`--bias-correction`", dict(bias_correction=True)),
        (4, "`--sequential`", dict(sequential=True)),
    ]
    for bits, label, options in rows:
        report, seconds = run(bits=bits, **options)
        cost = sum(layer.cost_solved for layer in report.layers)
        print(f"| {bits} | {label} | {report.evaluation.quantized_accuracy:.2%} | {drop(report)} | "
              f"{report.evaluation.top1_agreement:.2%} | {cost:.4g} | {seconds:.1f} |")


def scores(model_path: Path, inputs: dict) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0].astype(np.float64)


def part_activations(run: Runner, workdir: Path) -> None:
    print("\n### Quantized activations, 4-bit weights per channel: onnx-qubo against onnxruntime's "
          "`quantize_static`\n")
    calib = dict(np.load(run.model.with_name(run.model.stem + ".calib.npz")))
    evaluation = dict(np.load(run.model.with_name(run.model.stem + ".eval.npz")))
    labels = evaluation.pop("labels")
    calib.pop("labels", None)
    float_scores = scores(run.model, evaluation)

    class Reader(CalibrationDataReader):
        def __init__(self):
            count = len(next(iter(calib.values())))
            self.batches = iter([{k: v[i:i + 256] for k, v in calib.items()} for i in range(0, count, 256)])

        def get_next(self):
            return next(self.batches, None)

    ort_path = workdir / "ort_static.onnx"
    start = time.perf_counter()
    quantize_static(str(run.model), str(ort_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt4, activation_type=QuantType.QUInt8)
    ort_seconds = time.perf_counter() - start
    onnx.checker.check_model(onnx.load(ort_path), full_check=True)

    print("| quantizer | options | accuracy | drop (points) | images right only here / only in onnxruntime's | "
          "top-1 agreement with float | relative output error | size (bytes) | run time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    float_accuracy = float((float_scores.argmax(-1) == labels).mean())
    ort_right = scores(ort_path, evaluation).argmax(-1) == labels

    def row(name, label, path, seconds):
        y = scores(path, evaluation)
        right = y.argmax(-1) == labels
        accuracy = float(right.mean())
        error = np.linalg.norm(y - float_scores) / np.linalg.norm(float_scores)
        agreement = float((y.argmax(-1) == float_scores.argmax(-1)).mean())
        print(f"| {name} | {label} | {accuracy:.2%} | {(accuracy - float_accuracy) * 100:+.2f} | "
              f"{(right & ~ort_right).sum()} / {(~right & ort_right).sum()} | {agreement:.2%} | "
              f"{error:.4f} | {path.stat().st_size:,} | {seconds:.1f} |")

    row("onnxruntime `quantize_static`", "QDQ, per channel, QInt4 weights, QUInt8 activations, MinMax", ort_path,
        ort_seconds)
    for label, options in [
        ("`--bits 4 --activations int8`", dict(activations="int8")),
        ("`--bits 4 --activations uint8`", dict(activations="uint8")),
        ("`--bits 4 --activations int8 --bias int32`", dict(activations="int8", bias="int32")),
        ("`--bits 4 --activations int8 --sequential`", dict(activations="int8", sequential=True)),
        ("`--bits 4 --activations uint8 --sequential`", dict(activations="uint8", sequential=True)),
        ("`--bits 4 --activations int8 --sequential --bias int32`",
         dict(activations="int8", sequential=True, bias="int32")),
    ]:
        _, seconds = run(bits=4, **options)
        row("onnx-qubo", label, run.out, seconds)
    print(f"\nFloat model: {float_accuracy:.2%}. The images column counts test images that one model "
          "classifies right and onnxruntime's wrong, and the reverse (their difference is the accuracy "
          "difference). onnxruntime's quantizer also quantizes the input scaling "
          "(Mul) and the output logits and stores the bias as INT32; onnx-qubo quantizes the inputs of the "
          "dense layers.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--parts", nargs="+", default=["matrix", "options", "activations"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Runner(args.model, Path(tmp))
        first, _ = run(bits=8)
        print(f"Model `{args.model.name}`, float accuracy {first.evaluation.float_accuracy:.2%} "
              f"(onnxruntime, {first.evaluation.samples} test images).")
        if "matrix" in args.parts:
            part_matrix(run)
        if "options" in args.parts:
            part_options(run)
        if "activations" in args.parts:
            part_activations(run, Path(tmp))
    print(f"\nMachine: {machine()}.")
    print(f"Command: `python benchmarks/schemes.py {' '.join(sys.argv[1:])}`".rstrip())


if __name__ == "__main__":
    main()
