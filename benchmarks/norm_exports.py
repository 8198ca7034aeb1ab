"""Which norms torch's exporters write, and whether onnx-qubo finds the layer reading each (issue 19).

``--rotate auto`` and ``--scale auto`` treat a model as a transformer when a MatMul/Gemm reads a
LayerNorm or RMSNorm (``onnx_qubo.model.rotation.normalized_layer``): the op, or the elementwise chain
older opsets get. This exports a norm followed by a Linear with both of torch's exporters at several
opsets and prints the ops written and the layer found (``-`` where none is):

    pip install torch==2.13.0 onnxscript
    python benchmarks/norm_exports.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from onnx_qubo.model.rotation import normalized_layer
from onnx_qubo.pipeline import prepare

WIDTH = 64


class RsqrtNorm(torch.nn.Module):
    """RMSNorm written out as Hugging Face's Llama code writes it: ``w * (x * rsqrt(mean(x^2) + eps))``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(WIDTH) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Block(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.norm, self.linear = norm, torch.nn.Linear(WIDTH, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


NORMS = {"nn.LayerNorm": lambda: torch.nn.LayerNorm(WIDTH), "nn.RMSNorm": lambda: torch.nn.RMSNorm(WIDTH),
         "x * rsqrt(..) * w": RsqrtNorm}
EXPORTS = [("TorchScript", 14), ("TorchScript", 17), ("dynamo", 18), ("dynamo", 23)]


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}\n")
    print("| norm | exporter | opset | ops written | layer found |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, make in NORMS.items():
            for exporter, opset in EXPORTS:
                path = Path(folder) / "block.onnx"
                kwargs = {"dynamo": exporter == "dynamo", "opset_version": opset, "input_names": ["x"]}
                try:
                    torch.onnx.export(Block(make()).eval(), (torch.randn(2, 3, WIDTH),), str(path), **kwargs)
                except Exception as e:  # the TorchScript exporter has no rule for some ops (nn.RMSNorm)
                    print(f"| {name} | {exporter} | {opset} | not exported ({type(e).__name__}) | |")
                    continue
                model = onnx.load(str(path))
                ops = ", ".join(n.op_type for n in model.graph.node if n.op_type != "Constant")
                print(f"| {name} | {exporter} | {opset} | {ops} | {normalized_layer(prepare(model)) or '-'} |")


if __name__ == "__main__":
    main()
