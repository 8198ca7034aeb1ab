"""Train the second study model: a 64-64-32-10 ReLU MLP on scikit-learn's bundled handwritten
digits (1,797 real 8x8 images, 0-16 grey levels; no download), in plain numpy.

Writes, beside this script: digits_mlp.onnx (uint8 images [N, 8, 8] -> logits [N, 10]),
digits_mlp.calib.npz (300 training images) and digits_mlp.eval.npz (the 360 held-out images
with labels). scikit-learn is needed only here, to read the bundled data set.

Usage: python models/train_digits_mlp.py [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from mlp_training import save_model_and_data, to_onnx, train
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    digits = load_digits()
    images, labels = digits.images.astype(np.uint8), digits.target.astype(np.int64)
    order = np.random.default_rng(args.seed).permutation(len(images))
    test, trainval = order[:360], order[360:]
    x = images[trainval].reshape(-1, 64).astype(np.float32) / 16.0
    params = train(x, labels[trainval], (64, 64, 32, 10), args.epochs, args.seed, lr_decay=0.97)
    accuracy = save_model_and_data(to_onnx(params, "digits_mlp", (8, 8), 16.0), HERE, "digits_mlp",
                                   images[trainval[:300]], images[test], labels[test])
    print(f"float accuracy on the 360 held-out digits (onnxruntime): {accuracy:.4f}")


if __name__ == "__main__":
    main()
