"""How much of a language model's layer-input Gram matrices (the QUBO's G) is the inputs' mean,
and how much the first position of each window: what the layer objective weighs most.

    python benchmarks/llm_input_means.py MODEL_DIR CALIB.npz [--windows 8] [--layers 5,15,25]

MODEL_DIR holds an onnxruntime-genai ``model.onnx``; CALIB.npz its ``input_ids`` windows (the
LM benchmark's calibration data). Prints, for the MatMuls of the chosen transformer blocks, the
share of trace(G) that is the mean's (N |mean|^2 / sum |x|^2), the top eigenvalue's share, and
the share of the first position of each window.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_qubo.calibration.lm_inputs import LmInputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--layers", default="5,15,25")
    args = parser.parse_args()
    path = str(args.model_dir / "model.onnx")
    blocks = [f"layers.{k}/" for k in args.layers.split(",")]
    structure = onnx.load(path, load_external_data=False)
    inputs = {n.name: n.input[0] for n in structure.graph.node
              if n.op_type == "MatMul" and any(b in n.name for b in blocks)}
    model = onnx.load(path)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in dict.fromkeys(inputs.values()))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    tokens = np.load(args.calib)["input_ids"][:args.windows]
    feeds = LmInputs(structure).derive({"input_ids": tokens}, str(args.calib))
    names = {i.name for i in session.get_inputs()}
    wanted = list(dict.fromkeys(inputs.values()))
    values = dict(zip(wanted, session.run(wanted, {k: v for k, v in feeds.items() if k in names})))
    print(f"{len(tokens)} windows of {tokens.shape[1]} tokens\n")
    print("| MatMul | inputs | mean's share of trace(G) | top eigenvalue's share | first position's share |")
    print("|---|---|---|---|---|")
    for name, tensor in inputs.items():
        x = values[tensor].astype(np.float64)  # [windows, T, f]
        flat = x.reshape(-1, x.shape[-1])
        trace = np.einsum("nf,nf->", flat, flat)
        mean = flat.mean(axis=0)
        top = np.linalg.eigvalsh(flat.T @ flat)[-1]
        first = np.einsum("nf,nf->", x[:, 0], x[:, 0])
        print(f"| {name} | {x.shape[-1]} | {len(flat) * mean @ mean / trace:.3f} | {top / trace:.3f} | "
              f"{first / trace:.4f} (1/T = {1 / x.shape[1]:.4f}) |")


if __name__ == "__main__":
    main()
