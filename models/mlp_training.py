"""Train a ReLU MLP classifier on uint8 images in plain numpy and export it to ONNX.

Shared by the scripts that make the shipped models (train_mnist_mlp.py, train_digits_mlp.py).
The exported graph: uint8 images [N, H, W] -> Cast -> Reshape [N, H*W] -> Mul(1/max) ->
(Gemm(transB=1) -> Relu)* -> Gemm -> logits, with Gemm(transB=1) as PyTorch's exporter writes
nn.Linear. Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def init_params(widths, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """He-initialised (weight [out, in], bias [out]) pairs."""
    return [
        ((rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32),
         np.zeros(n_out, np.float32))
        for n_in, n_out in zip(widths[:-1], widths[1:])
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


def train(x, y, widths, epochs: int, seed: int, lr_decay: float = 0.7) -> list[tuple[np.ndarray, np.ndarray]]:
    """Adam on softmax cross-entropy, mini-batches of 128, learning rate 1e-3 multiplied by
    ``lr_decay`` after each epoch; x float [N, widths[0]]."""
    rng = np.random.default_rng(seed)
    params = init_params(widths, rng)
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
        lr *= lr_decay
        print(f"epoch {epoch + 1}/{epochs} done")
    return params


def to_onnx(params, name: str, image_shape: tuple[int, int], pixel_max: float) -> onnx.ModelProto:
    """uint8 [N,H,W] -> Cast -> Reshape [N,H*W] -> Mul(1/pixel_max) -> (Gemm -> Relu)* -> Gemm."""
    inits = [
        numpy_helper.from_array(np.array([-1, image_shape[0] * image_shape[1]], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(1.0 / pixel_max, np.float32), "inv_max"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Reshape", ["image_f", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Mul", ["flat", "inv_max"], ["x0"], name="normalize"),
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
        nodes, name,
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", *image_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", params[-1][0].shape[0]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnx-qubo models/mlp_training.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def save_model_and_data(model, out_dir: Path, name: str, calib_images, eval_images, eval_labels) -> float:
    """Write NAME.onnx, NAME.calib.npz ("image") and NAME.eval.npz ("image", "labels");
    return the float model's accuracy on the evaluation images, run by onnxruntime."""
    onnx.save(model, out_dir / f"{name}.onnx")
    np.savez_compressed(out_dir / f"{name}.calib.npz", image=calib_images)
    np.savez_compressed(out_dir / f"{name}.eval.npz", image=eval_images, labels=eval_labels.astype(np.int64))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": eval_images})[0]
    return float((logits.argmax(axis=1) == eval_labels).mean())
