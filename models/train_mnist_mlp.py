"""Train the shipped demo model: a 784-256-128-10 ReLU MLP on real MNIST, in plain numpy.

Writes, beside this script:
  mnist_mlp.onnx       uint8 images [N, 28, 28] -> logits [N, 10]; dense layers are
                       Gemm(transB=1), as PyTorch's exporter writes nn.Linear
  mnist_mlp.calib.npz  1,000 training images (key "image") for calibration
  mnist_mlp.eval.npz   the 10,000 test images ("image") with their "labels"

Usage: python models/train_mnist_mlp.py [--mnist ../shared/data/mnist.npz]
Deterministic for a given --seed; prints the float model's test accuracy (as run by onnxruntime).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from mlp_training import save_model_and_data, to_onnx, train

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", default=str(HERE.parent.parent / "shared" / "data" / "mnist.npz"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-size", type=int, default=1000)
    args = parser.parse_args()

    data = np.load(args.mnist)
    x_train = data["x_train"].reshape(-1, 784).astype(np.float32) / 255.0
    params = train(x_train, data["y_train"].astype(np.int64), (784, 256, 128, 10), args.epochs, args.seed)
    calib = np.sort(np.random.default_rng(args.seed + 1).choice(len(x_train), args.calib_size, replace=False))
    accuracy = save_model_and_data(to_onnx(params, "mnist_mlp", (28, 28), 255.0), HERE, "mnist_mlp",
                                   data["x_train"][calib], data["x_test"], data["y_test"])
    print(f"float test accuracy (onnxruntime, 10,000 images): {accuracy:.4f}")


if __name__ == "__main__":
    main()
