"""Train the Conv demo model: a small ReLU CNN on real MNIST, with PyTorch (training only).

Architecture (a plain and a grouped Conv, so that a layer has two patch Grams, then two Gemm):
  Conv(1->16, 3x3, pad 1) Relu MaxPool2
  Conv(16->32, 3x3, pad 1, group 2) Relu MaxPool2
  Flatten, Gemm(1568->64) Relu, Gemm(64->10)

Writes, beside this script:
  mnist_cnn.onnx       uint8 images [N, 28, 28] -> logits [N, 10] (opset 17, dynamic batch)
  mnist_cnn.calib.npz  512 training images (key "image") for calibration
  mnist_cnn.eval.npz   the 10,000 test images ("image") with their "labels"

Usage: python models/train_mnist_cnn.py [--mnist ../shared/data/mnist.npz]
Needs torch (not a dependency of the package). Deterministic for a given --seed on one machine;
prints the float model's test accuracy (as run by onnxruntime).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from mlp_training import save_model_and_data
from torch import nn

HERE = Path(__file__).resolve().parent


class MnistCnn(nn.Module):
    """uint8 images [N, 28, 28] -> logits [N, 10]; the scaling to [0, 1] is part of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32).unsqueeze(1) / 255.0
        return self.classifier(self.features(x))


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> MnistCnn:
    """Adam, mini-batches of 128, learning rate 2e-3 times 0.6 after each epoch."""
    torch.manual_seed(seed)
    model = MnistCnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.6)
    images, labels = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), 128):
            idx = order[start:start + 128]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        print(f"epoch {epoch + 1}/{epochs} done, last batch loss {loss.item():.4f}")
    return model.eval()


def to_onnx(model: MnistCnn) -> onnx.ModelProto:
    """Export with a dynamic batch axis (TorchScript exporter: Conv, Gemm(transB=1))."""
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (torch.zeros(1, 28, 28, dtype=torch.uint8),), path, dynamo=False,
                          input_names=["image"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
        exported = onnx.load(path)
    exported.producer_name = "onnx-qubo models/train_mnist_cnn.py"
    onnx.checker.check_model(exported, full_check=True)
    return exported


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mnist", default=str(HERE.parent.parent / "shared" / "data" / "mnist.npz"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-size", type=int, default=512)
    args = parser.parse_args()

    torch.set_num_threads(2)
    data = np.load(args.mnist)
    model = train(data["x_train"], data["y_train"], args.epochs, args.seed)
    calib = np.sort(np.random.default_rng(args.seed + 1).choice(len(data["x_train"]), args.calib_size, replace=False))
    accuracy = save_model_and_data(to_onnx(model), HERE, "mnist_cnn", data["x_train"][calib], data["x_test"],
                                   data["y_test"])
    print(f"float test accuracy (onnxruntime, 10,000 images): {accuracy:.4f}")


if __name__ == "__main__":
    main()
