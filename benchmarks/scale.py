"""How onnx-qubo scales with layer width: one big layer end to end, and per-stage cost fits.

    python benchmarks/scale.py run                  # one Gemm 4096x4096, 1,536 samples, bits 2 and 4
    python benchmarks/scale.py run --width 2048 --bits 2
    python benchmarks/scale.py fit                  # one layer at f = 256..4096: log-log slopes per stage
    python benchmarks/scale.py workers              # the fast solve on 1 vs 2 local worker processes
    python benchmarks/scale.py big                  # 36 x (MatMul 4096x4096 + Add), 2.4 GB of external data
    python benchmarks/scale.py decoder --blocks 12  # an LLM-shaped decoder, 2.5 GB: bits x workers x Ray

``run`` writes a Gemm model (seeded random weights) and correlated calibration inputs
``x = z @ L`` (z standard normal, L a random mixing: the Gram matrix is far from the identity)
to a temporary folder, then runs ``onnx_qubo.quantize`` with default flags in a fresh process
per configuration under cProfile: wall time, the time inside each stage (cumulative, main
thread) and the process's peak resident memory.

``big`` writes a 2.4 GB model (a residual stack ``x + x @ W_k``, k = 1..36, W_k 4096x4096, weights
in one external data file, written tensor by tensor), runs the CLI on it in a fresh process
(``--bits 4 --solver rtn --scale minmax`` unless ``--flags`` says otherwise) and reports its wall
time and peak resident memory (os.wait4), then loads the written model by path in onnxruntime
and measures how far its output is from the float model's on held-out inputs.

``decoder`` writes an LLM-shaped decoder (``--blocks`` blocks of single-head attention with q, k,
v, o projections d x d and a SiLU-gated FFN d -> ffn -> d, all 3-D MatMuls on [B, T, d], residual
adds; d = 2048, ffn = 5632: 12 blocks are 2.5 GB of external data) and quantizes it with default
flags for each ``--bits`` x (1 worker, ``--workers`` local processes, ``--ray local`` with that many
workers): wall time, peak memory, whether the outputs are byte-identical, and the solve seconds of
each layer shape (the report's per-layer times) against f. Peak memory is the CLI process's
(os.wait4): local workers are its children and Ray's are not, so Ray rows count the driver only.

``fit`` times the stages of one layer directly (no ONNX) for n = f in a range of widths and
fits ``time ~ f^k`` between consecutive widths and over the whole range: a stage whose work is
O(n f^2) = O(f^3) shows k near 3, one that is O(n f) near 2.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# (label, file suffix, function name): cumulative main-thread time in each. Matched on the
# function name and the tail of its file, so the stages are found wherever the pipeline calls them.
STAGES = [
    ("calibration", "calibration.py", "collect_statistics"),
    ("scale search", "scales.py", "choose_scales"),
    ("build QUBO", "qubo.py", "build_problem"),
    ("fast solve", "fast.py", "solve"),
    ("lower bound", "bounds.py", "lower_bounds"),
    ("energies", "qubo.py", "energy"),
    ("evaluation", "verify.py", "evaluate"),
]


def gemm_model(width: int, seed: int = 0) -> onnx.ModelProto:
    """x [B, f] -> Gemm(W [n, f], transB=1, bias) with n = f, weights ~ N(0, 1/f)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    b = (0.1 * rng.standard_normal(width)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1, name="dense")
    graph = helper.make_graph([node], "scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", width])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def correlated_inputs(samples: int, width: int, seed: int = 1) -> np.ndarray:
    """x = z @ L: z standard normal, L a random mixing scaled to keep x of order 1 (float32)."""
    rng = np.random.default_rng(seed)
    mixing = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    mixing += np.eye(width, dtype=np.float32)  # a well-spread but far from diagonal Gram
    return rng.standard_normal((samples, width)).astype(np.float32) @ mixing


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds per stage from a profile (0 for a stage that did not run)."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    out = dict.fromkeys((label for label, _, _ in STAGES), 0.0)
    for (filename, _, name), (_, _, _, cumulative, _) in stats.items():
        for label, suffix, function in STAGES:
            if name == function and filename.endswith(suffix):
                out[label] += cumulative
    return out


def one_run(folder: Path, bits: int) -> dict:
    """Quantize the model in ``folder`` at ``bits`` with default flags; in a fresh process."""
    import onnx_qubo

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    report = onnx_qubo.run(folder / "model.onnx", folder / f"out{bits}.onnx", onnx_qubo.QuantizeConfig.from_flat(
        bits=bits), calibration=folder / "model.calib.npz", evaluation=folder / "model.calib.npz").report
    profile.disable()
    seconds = time.perf_counter() - start
    layer = report.layers[0]
    return {"bits": bits, "seconds": seconds, "stages": stage_seconds(profile), "peak_mb": peak_mb(),
            "cost_rtn": layer.cost_rtn, "cost_solved": layer.cost_solved, "lower_bound": layer.lower_bound}


def part_run(width: int, samples: int, bits_list: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx.save(gemm_model(width), folder / "model.onnx")
        np.savez(folder / "model.calib.npz", x=correlated_inputs(samples, width))
        print(f"One Gemm {width}x{width}, {samples:,} correlated calibration samples, default flags "
              f"(--scale mse --solver fast); one fresh process per row.\n")
        labels = [label for label, _, _ in STAGES]
        print("| bits | wall (s) | " + " | ".join(f"{label} (s)" for label in labels)
              + " | peak memory (MB) | rtn cost | solved cost | solved / rtn |")
        print("|---" * (len(labels) + 6) + "|")
        for bits in bits_list:
            out = subprocess.run([sys.executable, __file__, "_one", str(folder), str(bits)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.splitlines()[-1])
            print(f"| {bits} | {r['seconds']:.1f} | " + " | ".join(f"{r['stages'][label]:.1f}" for label in labels)
                  + f" | {r['peak_mb']:.0f} | {r['cost_rtn']:.4g} | {r['cost_solved']:.4g} | "
                  f"{r['cost_solved'] / r['cost_rtn']:.3f} |", flush=True)


def layer_stages(width: int, samples: int, bits: int) -> dict[str, float]:
    """Seconds of each stage of one n = f = width layer, from the Gram matrix on (no ONNX)."""
    from onnx_qubo.core.grid import Scheme
    from onnx_qubo.rounding.bounds import lower_bounds
    from onnx_qubo.rounding.qubo import build_problem
    from onnx_qubo.rounding.scales import choose_scales
    from onnx_qubo.rounding.solvers import FastSolver, RoundToNearest

    x = correlated_inputs(samples, width).astype(np.float64)
    w = np.random.default_rng(0).standard_normal((width, width)) / np.sqrt(width)
    times: dict[str, float] = {}

    def timed(label, call):
        start = time.perf_counter()
        result = call()
        times[label] = time.perf_counter() - start
        return result

    gram = timed("gram", lambda: x.T @ x / samples)
    scheme = Scheme(bits)
    scales = timed("scale search", lambda: choose_scales("mse", w, scheme, gram))
    problem = timed("build QUBO", lambda: build_problem(w, scales.scale, 0, 1.0, scheme.grid, gram))
    choice = timed("fast solve", lambda: FastSolver().solve(problem, 0))
    timed("energies", lambda: (problem.energy(choice), problem.energy(RoundToNearest().solve(problem))))
    timed("lower bound", lambda: lower_bounds(problem))
    return times


def part_fit(widths: list[int], samples: int, bits: int) -> None:
    rows = []
    for width in widths:
        out = subprocess.run([sys.executable, __file__, "_stages", str(width), str(samples), str(bits)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.splitlines()[-1]))
    labels = list(rows[0])
    print(f"One n = f layer, {bits} bits, {samples:,} samples, stages from the Gram matrix on (seconds); "
          "slope = d log t / d log f from the previous width.\n")
    print("| f | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for k, (width, row) in enumerate(zip(widths, rows)):
        cells = []
        for label in labels:
            cell = f"{row[label]:.3f}"
            if k:
                cell += f" ({np.log(row[label] / rows[k - 1][label]) / np.log(width / widths[k - 1]):.1f})"
            cells.append(cell)
        print(f"| {width} | " + " | ".join(cells) + " |")
    last = [r for w, r in zip(widths, rows) if w >= 1024]
    if len(last) >= 2:
        big = [w for w in widths if w >= 1024]
        print("\nLeast-squares slope over f >= 1024: " + ", ".join(
            f"{label} {np.polyfit(np.log(big), np.log([r[label] for r in last]), 1)[0]:.2f}" for label in labels))


def part_workers(width: int, samples: int, bits: int, workers: int) -> None:
    """Solve time of one layer on 1 and on ``workers`` local processes (the same rounding)."""
    from onnx_qubo.core.grid import Scheme
    from onnx_qubo.rounding.qubo import build_problem
    from onnx_qubo.rounding.scales import choose_scales
    from onnx_qubo.rounding.workers import solve_layer

    x = correlated_inputs(samples, width).astype(np.float64)
    w = np.random.default_rng(0).standard_normal((width, width)) / np.sqrt(width)
    gram = x.T @ x / samples
    scheme = Scheme(bits)
    problem = build_problem(w, choose_scales("mse", w, scheme, gram).scale, 0, 1.0, scheme.grid, gram)
    print(f"load before: {os.getloadavg()}")
    results = {}
    for count in (1, workers):
        start = time.perf_counter()
        results[count] = solve_layer(problem, "fast", 0, workers=count)
        print(f"| {count} | {time.perf_counter() - start:.1f} |", flush=True)
    print(f"identical: {np.array_equal(results[1], results[workers])}; load after: {os.getloadavg()}")


def write_residual_stack(folder: Path, blocks: int, width: int, seed: int = 0) -> Path:
    """``blocks`` x (MatMul W_k [width, width] + Add of the block's input), weights ~ N(0, 1/(blocks
    width)) so the stream keeps its scale; the weights go to ``model.onnx.data`` one at a time."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    data = folder / "model.onnx.data"
    x = "x"
    with open(data, "wb") as out:
        for k in range(blocks):
            w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(blocks * width)).astype(np.float32)
            tensor = onnx.TensorProto(name=f"W{k}", data_type=TensorProto.FLOAT, dims=[width, width])
            for key, value in (("location", data.name), ("offset", out.tell()), ("length", w.nbytes)):
                tensor.external_data.add(key=key, value=str(value))
            tensor.data_location = TensorProto.EXTERNAL
            out.write(w.tobytes())
            initializers.append(tensor)
            nodes += [helper.make_node("MatMul", [x, f"W{k}"], [f"h{k}"], name=f"matmul{k}"),
                      helper.make_node("Add", [x, f"h{k}"], [f"x{k}"], name=f"residual{k}")]
            x = f"x{k}"
    graph = helper.make_graph(nodes, "residual_stack",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", width])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def part_big(folder: Path, blocks: int, width: int, samples: int, flags: list[str]) -> None:
    """Quantize the residual stack with the CLI; time, peak memory and output error."""
    import onnxruntime as ort

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.onnx"
    if not model.exists():
        start = time.perf_counter()
        write_residual_stack(folder, blocks, width)
        print(f"wrote {model} in {time.perf_counter() - start:.0f} s")
    np.savez(folder / "model.calib.npz", x=correlated_inputs(samples, width, seed=1))
    held_out = correlated_inputs(64, width, seed=2)
    sizes = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    output = folder / "out.onnx"
    print(f"{blocks} x (MatMul {width}x{width} + Add), {sizes / 1e9:.2f} GB; {samples} calibration samples\n"
          f"$ onnx-qubo quantize model.onnx out.onnx {' '.join(flags)}")
    seconds, peak, stdout = run_cli(model, output, flags)
    report = [line for line in stdout.splitlines() if "GB" in line or "output" in line.lower()][:6]
    print("\n".join(report))
    written = sum(p.stat().st_size for p in folder.glob("out.onnx*"))
    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (model, output)]
    y_float, y_quant = (session.run(None, {"x": held_out})[0] for session in sessions)
    error = float(np.linalg.norm(y_quant - y_float) / np.linalg.norm(y_float))
    cosine = float(np.mean(np.sum(y_float * y_quant, axis=1)
                           / (np.linalg.norm(y_float, axis=1) * np.linalg.norm(y_quant, axis=1))))
    print(f"\n| model | output | wall (s) | peak memory (GB) | relative output error (64 held-out) | mean cosine |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {sizes / 1e9:.2f} GB | {written / 1e9:.2f} GB | {seconds:.0f} | {peak:.2f} | "
          f"{error:.4f} | {cosine:.5f} |")


def write_decoder(folder: Path, blocks: int, width: int, ffn: int, seed: int = 0) -> Path:
    """The decoder of the module docstring; weights ~ N(0, 1/(fan_in * blocks)) written one at a time."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    data = folder / "model.onnx.data"

    def weight(name: str, rows: int, columns: int, out) -> str:
        w = (rng.standard_normal((rows, columns), dtype=np.float32) / np.sqrt(rows * blocks)).astype(np.float32)
        tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[rows, columns])
        for key, value in (("location", data.name), ("offset", out.tell()), ("length", w.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        tensor.data_location = TensorProto.EXTERNAL
        out.write(w.tobytes())
        initializers.append(tensor)
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    x = "x"
    initializers.append(numpy_helper.from_array(np.array(1 / np.sqrt(width), np.float32), "inv_sqrt_d"))
    with open(data, "wb") as out:
        for k in range(blocks):
            q, key, v = (node("MatMul", [x, weight(f"b{k}.{p}", width, width, out)], f"b{k}.{p}_out")
                         for p in ("q", "k", "v"))
            scores = node("Mul", [node("MatMul", [q, node("Transpose", [key], f"b{k}.kT", perm=[0, 2, 1])],
                                       f"b{k}.qk"), "inv_sqrt_d"], f"b{k}.scores")
            attended = node("MatMul", [node("Softmax", [scores], f"b{k}.probs", axis=-1), v], f"b{k}.attended")
            o = node("MatMul", [attended, weight(f"b{k}.o", width, width, out)], f"b{k}.o_out")
            x = node("Add", [x, o], f"b{k}.h")
            gate = node("MatMul", [x, weight(f"b{k}.gate", width, ffn, out)], f"b{k}.gate_out")
            up = node("MatMul", [x, weight(f"b{k}.up", width, ffn, out)], f"b{k}.up_out")
            silu = node("Mul", [gate, node("Sigmoid", [gate], f"b{k}.sigmoid")], f"b{k}.silu")
            down = node("MatMul", [node("Mul", [silu, up], f"b{k}.gated"), weight(f"b{k}.down", ffn, width, out)],
                        f"b{k}.down_out")
            x = node("Add", [x, down], f"b{k}.out")
    shape = ["B", "T", width]
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def run_cli(model: Path, output: Path, flags: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak resident GB and stdout of the CLI on ``model`` in a fresh process."""
    command = [sys.executable, "-m", "onnx_qubo", "quantize", str(model), str(output), "--quiet", *flags]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        print(stdout)
        raise SystemExit(f"onnx-qubo {' '.join(flags)} failed with status {status}")
    return time.perf_counter() - start, usage.ru_maxrss / 1e6, stdout


def part_decoder(folder: Path, blocks: int, width: int, ffn: int, samples: int, tokens: int, bits_list: list[int],
                 workers: int, placements: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.onnx"
    if not model.exists():
        write_decoder(folder, blocks, width, ffn)
    x = correlated_inputs(samples * tokens, width, seed=1).reshape(samples, tokens, width)
    np.savez(folder / "model.calib.npz", x=x)
    size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    print(f"decoder: {blocks} blocks, d={width}, ffn={ffn}, {size / 1e9:.2f} GB; {samples} calibration sequences "
          f"of {tokens} tokens; default flags\n")
    print("| bits | solve on | wall (s) | solve (s) | solve / 1 process | peak memory (GB) "
          "| output identical to 1 worker |\n|---|---|---|---|---|---|---|")
    shapes: dict[tuple[int, int, str], list[float]] = {}
    for bits in bits_list:
        first, first_solve = None, None
        runs = {"process": ("1 process", []), "workers": (f"{workers} workers", ["--workers", str(workers)]),
                "ray": (f"Ray local, {workers} workers", ["--ray", "local", "--workers", str(workers)])}
        for label, flags in (runs[name] for name in placements):
            output = folder / f"out{bits}_{len(flags)}.onnx"
            report_path = folder / f"report{bits}_{len(flags)}.json"
            seconds, peak, _ = run_cli(model, output, ["--bits", str(bits), "--no-speed", "--report",
                                                       str(report_path), *flags])
            same = "-" if first is None else str(output.read_bytes() == first.read_bytes())
            first = first or output
            layers = json.loads(report_path.read_text())["layers"]
            solve = sum(layer["solve_seconds"] for layer in layers)
            first_solve = first_solve or solve
            print(f"| {bits} | {label} | {seconds:.0f} | {solve:.0f} | {solve / first_solve:.2f} | {peak:.2f} "
                  f"| {same} |", flush=True)
            if not flags:
                for layer in layers:
                    key = (layer["n_out"], layer["f_in"], f"{bits} bits")
                    shapes.setdefault(key, []).append(layer["solve_seconds"])
    print("\nPer-layer solve seconds (1 process; mean over the layers of that shape):\n")
    print("| n_out | f_in | bits | layers | solve (s) |\n|---|---|---|---|---|")
    for (n, f, bits_label), times in sorted(shapes.items()):
        print(f"| {n} | {f} | {bits_label} | {len(times)} | {np.mean(times):.1f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        print(json.dumps(one_run(Path(sys.argv[2]), int(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_stages":
        print(json.dumps(layer_stages(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["run", "fit", "workers", "big", "decoder"])
    parser.add_argument("--ffn", type=int, default=5632, help="decoder: FFN width")
    parser.add_argument("--tokens", type=int, default=16, help="decoder: tokens per calibration sequence")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "onnx-qubo-big",
                        help="big: where the model is written (kept, reused when present)")
    parser.add_argument("--blocks", type=int, default=36)
    parser.add_argument("--flags", default="--bits 4 --solver rtn --scale minmax",
                        help="big: the CLI's flags")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (1536; big: 512)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--placements", nargs="+", choices=["process", "workers", "ray"],
                        default=["process", "workers", "ray"], help="decoder: where the layers are solved")
    args = parser.parse_args()
    if args.samples is None:
        args.samples = {"big": 512, "decoder": 96}.get(args.mode, 1536)
    if args.mode == "decoder" and args.width == 4096 and "--width" not in sys.argv:
        args.width = 2048
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}; load average {os.getloadavg()[0]:.2f}\n")
    if args.mode == "run":
        part_run(args.width, args.samples, args.bits)
    elif args.mode == "decoder":
        part_decoder(args.folder, args.blocks, args.width, args.ffn, args.samples, args.tokens, args.bits, args.workers,
                     args.placements)
    elif args.mode == "big":
        part_big(args.folder, args.blocks, args.width, args.samples, args.flags.split())
    elif args.mode == "fit":
        part_fit(args.widths, args.samples, args.bits[0])
    else:
        part_workers(args.width, args.samples, args.bits[0], args.workers)


if __name__ == "__main__":
    main()
