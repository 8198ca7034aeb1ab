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
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
WIDTHS = (784, 256, 128, 10)


def init_params(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """He-initialised (weight [out, in], bias [out]) pairs."""
    return [
        ((rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32),
         np.zeros(n_out, np.float32))
        for n_in, n_out in zip(WIDTHS[:-1], WIDTHS[1:])
    ]


def forward(params, x):
    """Return the activations of every layer (inputs to each Linear) and the logits."""
    acts = [x]
    for k, (w, b) in enumerate(params):
        z = acts[-1] @ w.T + b
        if k < len(params) - 1:
            acts.append(np.maximum(z, 0.0))
        else:
            return acts, z
    raise AssertionError("unreachable")


def train(x, y, epochs: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Adam on softmax cross-entropy, mini-batches of 128."""
    rng = np.random.default_rng(seed)
    params = init_params(rng)
    flat = [p for pair in params for p in pair]
    m = [np.zeros_like(p) for p in flat]
    v = [np.zeros_like(p) for p in flat]
    lr, beta1, beta2, eps, step = 1e-3, 0.9, 0.999, 1e-8, 0
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), 128):
            idx = order[start:start + 128]
            acts, logits = forward(params, x[idx])
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1.0
            delta = p / len(idx)
            grads = []
            for k in reversed(range(len(params))):
                w, _ = params[k]
                grads = [delta.T @ acts[k], delta.sum(axis=0)] + grads
                if k > 0:
                    delta = (delta @ w) * (acts[k] > 0)
            step += 1
            for i, g in enumerate(grads):
                m[i] = beta1 * m[i] + (1 - beta1) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                mhat = m[i] / (1 - beta1 ** step)
                vhat = v[i] / (1 - beta2 ** step)
                flat[i] -= lr * mhat / (np.sqrt(vhat) + eps)
        lr *= 0.7
        print(f"epoch {epoch + 1}/{epochs} done")
    return params


def to_onnx(params) -> onnx.ModelProto:
    """uint8 [N,28,28] -> Cast -> Reshape [N,784] -> Mul(1/255) -> (Gemm -> Relu)* -> Gemm."""
    inits = [
        numpy_helper.from_array(np.array([-1, 784], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(1.0 / 255.0, np.float32), "inv_255"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Reshape", ["image_f", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Mul", ["flat", "inv_255"], ["x0"], name="normalize"),
    ]
    for k, (w, b) in enumerate(params):
        inits += [numpy_helper.from_array(w, f"fc{k + 1}.weight"),
                  numpy_helper.from_array(b, f"fc{k + 1}.bias")]
        out = "logits" if k == len(params) - 1 else f"fc{k + 1}_out"
        nodes.append(helper.make_node("Gemm", [f"x{k}", f"fc{k + 1}.weight", f"fc{k + 1}.bias"],
                                      [out], transB=1, name=f"fc{k + 1}"))
        if k < len(params) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"x{k + 1}"], name=f"relu{k + 1}"))
    graph = helper.make_graph(
        nodes, "mnist_mlp",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnx-qubo models/train_mnist_mlp.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", default=str(HERE.parent.parent / "shared" / "data" / "mnist.npz"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-size", type=int, default=1000)
    args = parser.parse_args()

    data = np.load(args.mnist)
    x_train = data["x_train"].reshape(-1, 784).astype(np.float32) / 255.0
    params = train(x_train, data["y_train"].astype(np.int64), args.epochs, args.seed)
    model = to_onnx(params)
    onnx.save(model, HERE / "mnist_mlp.onnx")

    calib_idx = np.random.default_rng(args.seed + 1).choice(len(x_train), args.calib_size, replace=False)
    np.savez_compressed(HERE / "mnist_mlp.calib.npz", image=data["x_train"][np.sort(calib_idx)])
    np.savez_compressed(HERE / "mnist_mlp.eval.npz", image=data["x_test"],
                        labels=data["y_test"].astype(np.int64))

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": data["x_test"]})[0]
    accuracy = float((logits.argmax(axis=1) == data["y_test"]).mean())
    print(f"float test accuracy (onnxruntime, 10,000 images): {accuracy:.4f}")


if __name__ == "__main__":
    main()
