"""Try the CLI, as a new user would, on models exported by other tools.

    pip install torch==2.13.0 scikit-learn skl2onnx onnxscript
    python benchmarks/exporters.py [--bits 2 4] [--workdir DIR]

Trains three small models on a slice of MNIST and exports each with its own tool:
  pytorch      nn.Sequential MLP, torch.onnx.export            (Gemm, transB=1)
  sklearn      MLPClassifier, skl2onnx                          (MatMul + Add)
  transformer  per-token MLP block with a residual on [B, 16, 49] image patches, then a
               classifier head, torch export (MatMul + Add on 3-D activations, then Gemm)
then runs ``onnx-qubo IN OUT --bits B --report R`` on each in a subprocess (data beside the
model), once more at 4 bits with a full deployment scheme (``DEPLOYMENT``: asymmetric blocks,
quantized inputs, INT32 bias, sequential calibration), prints a Markdown table from the JSON
reports, and runs ``onnx-qubo compare`` on the PyTorch export. The product itself never
imports torch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
DEPLOYMENT = ["--bits", "4", "--granularity", "block", "--block-size", "16", "--asymmetric",
              "--activations", "uint8", "--bias", "int32", "--sequential"]


def load_mnist(n_train=12000, n_calib=512, n_eval=5000):
    data = np.load(MNIST)
    x = data["x_train"][:n_train].reshape(n_train, -1).astype(np.float32) / 255
    y = data["y_train"][:n_train].astype(np.int64)
    x_eval = data["x_test"][:n_eval].reshape(n_eval, -1).astype(np.float32) / 255
    y_eval = data["y_test"][:n_eval].astype(np.int64)
    return x, y, x[:n_calib], x_eval, y_eval


def export_pytorch(x, y, path: Path, patches: bool) -> str:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if patches:  # [B, 16 patches, 49 pixels] -> per-token MLP with residual -> flatten -> classes
        class Tokens(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed, self.mlp, self.head = nn.Linear(49, 32), nn.Linear(32, 32), nn.Linear(16 * 32, 10)

            def forward(self, t):
                h = torch.relu(self.embed(t))
                h = h + torch.relu(self.mlp(h))
                return self.head(h.flatten(1))
        model, inputs = Tokens(), to_patches(x)
    else:
        model, inputs = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                      nn.Linear(64, 10)), x
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(inputs), torch.from_numpy(y)
    for _ in range(8):
        for i in range(0, len(xt), 128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[i:i + 128]), yt[i:i + 128]).backward()
            optimizer.step()
    model.eval()
    example = xt[:2]
    torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    return "input"


def export_sklearn(x, y, path: Path) -> str:
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=15, random_state=0).fit(x, y)
    onx = to_onnx(clf, x[:1], target_opset=17, options={id(clf): {"zipmap": False}})
    path.write_bytes(onx.SerializeToString())
    return onx.graph.input[0].name


def to_patches(x: np.ndarray) -> np.ndarray:
    """[N, 784] -> [N, 16, 49]: the 7x7 patches of each 28x28 image."""
    img = x.reshape(-1, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(img.reshape(-1, 16, 49))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="onnx-qubo-exporters-"))
    work.mkdir(parents=True, exist_ok=True)
    x, y, x_calib, x_eval, y_eval = load_mnist()

    cases = []
    for name in ("pytorch", "sklearn", "transformer"):
        model = work / f"{name}.onnx"
        if name == "sklearn":
            input_name = export_sklearn(x, y, model)
        else:
            input_name = export_pytorch(x, y, model, patches=name == "transformer")
        transform = to_patches if name == "transformer" else (lambda a: a)
        np.savez(work / f"{name}.calib.npz", **{input_name: transform(x_calib)})
        np.savez(work / f"{name}.eval.npz", **{input_name: transform(x_eval)}, labels=y_eval)
        cases.append((name, model))

    print("| exporter | dense layers found (forms) | flags | float acc. | quantized acc. | top-1 agreement | "
          "default = basic |")
    print("|---|---|---|---|---|---|---|")
    for name, model in cases:
        for flags in [["--bits", str(bits)] for bits in args.bits] + [DEPLOYMENT]:
            stem = f"{name}_{'_'.join(f.strip('-') for f in flags)}"
            out, report = work / f"{stem}.onnx", work / f"{stem}.json"
            cmd = ["onnx-qubo", str(model), str(out), *flags, "--report", str(report), "--quiet"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            r = json.loads(report.read_text())
            forms = sorted({layer["form"] for layer in r["layers"]})
            ev = r["evaluation"]
            print(f"| {name} | {len(r['layers'])} ({', '.join(forms)}) | `{' '.join(flags)}` | "
                  f"{ev['float_accuracy']:.2%} | {ev['quantized_accuracy']:.2%} | {ev['top1_agreement']:.2%} | "
                  f"{'yes' if ev['default_matches_basic'] else 'NO'} |")
    # the paper's study on a model this project did not train, as a user would run it
    cmd = ["onnx-qubo", "compare", str(work / "pytorch.onnx"), "--bits", "8,4,2", "--samples", "10", "--quiet"]
    print(f"\n`{' '.join(['onnx-qubo', 'compare', 'pytorch.onnx', *cmd[3:]])}`:\n")
    print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(f"Models, data and reports in {work}. Command: python benchmarks/exporters.py "
          + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
