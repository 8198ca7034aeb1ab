# ruff: noqa: E501
"""Conv models written with ``--format ort --activations uint8 --bits 8`` (QLinearConv where it is
faster, MatMulIntegerToFloat for the dense layers) against float and ``--format qdq``.

    python benchmarks/qlinear_conv.py [--ocr-data /tmp/dsc/rapid128.npz] [--reps 20]

Models: the shipped CNN demo (models/mnist_cnn.onnx, 256 calibration and 256 evaluation images)
and the PP-OCRv4 text recognizer (rapidocr-onnxruntime 1.4.4, cached by benchmarks/real_models.py;
32 calibration images [32, 3, 48, 320] and 32 other ones to evaluate, from an .npz with key ``x``).
Rounding: round to nearest (``solver="rtn"``): the solver changes the codes, not the kernels.
Latency: onnxruntime's default level and threads, median of ``--reps`` runs per model and batch,
the three models' runs interleaved so load on the machine hits them alike; ratios are against
float in the same run. Error: ||y - y_float|| / ||y_float|| on the evaluation images.
"""
from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_qubo import QuantizeConfig, run

ROOT = Path(__file__).resolve().parent.parent
OCR = Path.home() / ".cache/onnx-qubo-realmodels/rapidocr-onnxruntime-1.4.4/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def relative(y: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm((y - reference).ravel()) / np.linalg.norm(reference.ravel()))


def bench(label: str, model_path: Path, calib: np.ndarray, evaluation: np.ndarray, batches: tuple[int, ...],
          reps: int, folder: Path) -> list[str]:
    model = onnx.load(model_path)
    name = model.graph.input[0].name
    models, kernels = {"float": model}, {}
    for fmt in ("qdq", "ort"):
        path = folder / f"{model_path.stem}.{fmt}.onnx"
        start = time.perf_counter()
        config = QuantizeConfig.from_flat(bits=8, activations="uint8", format=fmt, solver="rtn", batch_size=16,
                                          sequential=False)  # the forms compared, on the inputs they were measured on
        report = run(model, path, config, calibration={name: calib}, evaluation={name: evaluation}, speed=False).report
        models[fmt] = onnx.load(path)
        kernels[fmt] = (collections.Counter(layer.kernel for layer in report.layers), time.perf_counter() - start)
    sessions = {key: session(m) for key, m in models.items()}
    outputs = {key: s.run(None, {name: evaluation})[0].astype(np.float64) for key, s in sessions.items()}
    times: dict[tuple[str, int], list[float]] = {(key, b): [] for key in sessions for b in batches}
    for (key, b) in times:
        sessions[key].run(None, {name: evaluation[:b]})  # warm up
    for _ in range(reps):
        for (key, b), samples in times.items():
            start = time.perf_counter()
            sessions[key].run(None, {name: evaluation[:b]})
            samples.append(1000 * (time.perf_counter() - start))
    median = {k: float(np.median(v)) for k, v in times.items()}
    lines = [f"### {label}", "",
             "| model | kernels | " + " | ".join(f"batch {b} (ms) | x float" for b in batches) + " | error vs float | vs qdq |",
             "|---|---|" + "---|---|" * len(batches) + "---|---|"]
    for key in sessions:
        what = "float" if key == "float" else ", ".join(f"{n} {k}" for k, n in kernels[key][0].most_common())
        cells = " | ".join(f"{median[(key, b)]:.2f} | {median[(key, b)] / median[('float', b)]:.2f}" for b in batches)
        vs_qdq = "-" if key == "float" else f"{relative(outputs[key], outputs['qdq']):.4f}"
        lines.append(f"| {key} | {what} | {cells} | {relative(outputs[key], outputs['float']):.4f} | {vs_qdq} |")
    lines.append("")
    lines.append(f"quantizing: qdq {kernels['qdq'][1]:.1f} s, ort {kernels['ort'][1]:.1f} s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ocr-data", type=Path, default=Path("/tmp/dsc/rapid128.npz"))
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    lines = [f"onnxruntime {ort.__version__}, default level and threads; rtn rounding, 8-bit weights per channel, "
             "uint8 activations (minmax)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        mnist = ROOT / "models/mnist_cnn"
        calib = np.load(f"{mnist}.calib.npz")["image"][:256]
        evaluation = np.load(f"{mnist}.eval.npz")["image"][:256]
        lines += bench("MNIST CNN demo (models/mnist_cnn.onnx)", mnist.with_suffix(".onnx"), calib, evaluation,
                       (1, 256), args.reps, Path(tmp))
        if OCR.exists() and args.ocr_data.exists():
            images = np.load(args.ocr_data)["x"]
            lines += [""] + bench("PP-OCRv4 recognizer (rapidocr-onnxruntime 1.4.4)", OCR, images[:32], images[32:64],
                                  (1, 8), args.reps, Path(tmp))
        else:
            lines.append(f"PP-OCRv4 recognizer skipped: {OCR} or {args.ocr_data} missing")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
