"""What moving an RMS norm's gain into the weights costs the rounding (`--rotate-residual`, issue 19).

A layer reading ``y = n * g`` (``n`` the normalized stream, ``g`` the norm's gain) rounds its weight
``W`` with the gain in its activations; with the residual stream turned as one (QuaRot), it rounds
``diag(g) W`` instead, and its activations are ``n``. Under a flat rounding error whose size
follows the weight's scale, the first errs by ``sum_i g_i^2 E[n_i^2]`` and the second by
``mean(g^2) sum_i E[n_i^2]`` (times the same grid step squared): their ratio says how much the
fold should cost each norm's readers before the QUBO exploits anything. This script prints that
ratio per norm of a genai model (its SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization
outputs over calibration windows), and with ``--reports`` compares two onnx-qubo JSON reports of the
same model layer kind by layer kind (the summed final costs), e.g. without and with the fold.

    python benchmarks/norm_gains.py FLOAT/model.onnx CALIB.npz [--windows 8]
        [--reports DEFAULT.report.json RESIDUAL.report.json] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's onnx_qubo

from onnx_qubo.calibration.data import load_dataset  # noqa: E402


def gain_ratios(path: Path, windows: np.ndarray) -> list[tuple[str, float]]:
    """Per RMS norm of the model: mean(g^2) sum E[n^2] / sum g^2 E[n^2] over ``windows`` of token ids."""
    header = onnx.load(str(path), load_external_data=False)
    norms = [n for n in header.graph.node if n.op_type.endswith("SimplifiedLayerNormalization")]
    model = onnx.load(str(path))
    gains = {n.name: numpy_helper.to_array(next(i for i in model.graph.initializer
                                                if i.name == n.input[1 if n.op_type.startswith("Simplified") else 2]))
             for n in norms}
    outputs = [n.output[0] for n in norms]
    for name in outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusion hides a norm's output
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    energy = [np.zeros(0)] * len(outputs)  # sum over positions of y_i^2
    for batch in load_dataset({"input_ids": windows}, header, batch_size=1).batches:
        for k, value in enumerate(session.run(outputs, batch)):
            squares = (value.reshape(-1, value.shape[-1]).astype(np.float64) ** 2).sum(0)
            energy[k] = squares if energy[k].size == 0 else energy[k] + squares
    ratios = []
    for norm, y2 in zip(norms, energy):
        g2 = gains[norm.name].astype(np.float64) ** 2
        ratios.append((norm.name, float(np.mean(g2) * (y2 / g2).sum() / y2.sum())))
    return ratios


def kind(layer: str) -> str:
    """A layer's kind: the path element before its op (``/model/layers.3/mlp/up_proj/MatMul`` -> up_proj)."""
    parts = layer.strip("/").split("/")
    return parts[-2] if len(parts) > 1 else parts[0]


def costs_by_kind(report: Path) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for layer in json.loads(report.read_text())["layers"]:
        cost = layer["cost_solved"] if layer.get("cost_bias_corrected") is None else layer["cost_bias_corrected"]
        sums[kind(layer["name"])] += cost
    return dict(sums)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path, help=".npz with input_ids [windows, tokens]")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--reports", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with np.load(args.calib) as data:
        windows = data["input_ids"][:args.windows]
    ratios = gain_ratios(args.model, windows)
    lines = [f"`python benchmarks/norm_gains.py {' '.join(sys.argv[1:])}`", "",
             f"Flat-error estimate of the fold's cost per norm ({len(windows)} windows of {windows.shape[1]} tokens): "
             "`mean(g^2) sum E[n^2] / sum g^2 E[n^2]`", "", "| norm | folded / kept |", "|---|---|"]
    lines += [f"| {name} | {ratio:.2f} |" for name, ratio in ratios]
    values = np.array([r for _, r in ratios])
    lines += ["", f"median {np.median(values):.2f}, range {values.min():.2f}-{values.max():.2f}"]
    if args.reports:
        before, after = (costs_by_kind(path) for path in args.reports)
        lines += ["", f"Summed final layer costs by kind: `{args.reports[0]}` -> `{args.reports[1]}`", "",
                  "| layers | before | after | after / before |", "|---|---|---|---|"]
        lines += [f"| {name} | {before[name]:.4g} | {after.get(name, float('nan')):.4g} | "
                  f"{after.get(name, float('nan')) / before[name]:.3f} |" for name in before]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
