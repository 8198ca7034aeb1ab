"""Speed of onnxruntime's MatMulNBits (4 bits, blocks of 32) by zero-point kind: none (signed
codes), packed uint8 integer zero points, and float zero points (what onnxruntime's own HQQ
quantizer writes, and ``--float-zero-points``), against a float MatMul of the same weight.

Why: backends/ort.py writes MatMulNBits only where onnxruntime has a prepacked CPU kernel; this
measures whether float zero points have one. Ratios are against the float MatMul measured in
the same run (the machine is shared: the load average is printed).

    python benchmarks/matmul_nbits_zero_points.py [--size 2048] [--seconds 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BLOCK = 32


def layer_model(size: int, zero_points: np.ndarray | None, level: int, weight: np.ndarray | None = None) -> bytes:
    """One MatMulNBits (or, with ``weight``, a float MatMul) of a [size, size] weight."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])
    if weight is not None:
        node = helper.make_node("MatMul", ["x", "W"], ["y"])
        graph = helper.make_graph([node], "float", [x], [y], [numpy_helper.from_array(weight, "W")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    rng = np.random.default_rng(0)
    blocks = size // BLOCK
    initializers = [numpy_helper.from_array(rng.integers(0, 256, (size, blocks, BLOCK // 2), dtype=np.uint8), "B"),
                    numpy_helper.from_array((rng.random(size * blocks) * 0.01).astype(np.float32), "scales")]
    inputs = ["x", "B", "scales"]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=size, N=size, bits=4,
                            block_size=BLOCK, accuracy_level=level)
    graph = helper.make_graph([node], "nbits", [x], [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def milliseconds(model: bytes, x: np.ndarray, seconds: float) -> float:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    session.run(None, {"x": x})
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"x": x})
        runs += 1
    return (time.perf_counter() - start) / runs * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    size, rng = args.size, np.random.default_rng(1)
    blocks = size // BLOCK
    kinds = {"none (signed codes)": None,
             "uint8 (integer)": rng.integers(0, 256, (size, -(-blocks // 2)), dtype=np.uint8),
             "float": (rng.random(size * blocks) * 15).astype(np.float32)}
    weight = rng.standard_normal((size, size)).astype(np.float32)
    print(f"onnxruntime {ort.__version__}, {size}x{size} weight, blocks of {BLOCK}, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| zero points | accuracy_level | batch | ms | x float MatMul |\n|---|---|---|---|---|")
    for batch in (1, 64):
        x = rng.standard_normal((batch, size)).astype(np.float32)
        base = milliseconds(layer_model(size, None, 0, weight), x, args.seconds)
        print(f"| float MatMul (baseline) | - | {batch} | {base:.3f} | 1.00 |")
        for level in (0, 4):
            for kind, zero_points in kinds.items():
                ms = milliseconds(layer_model(size, zero_points, level), x, args.seconds)
                print(f"| {kind} | {level} | {batch} | {ms:.3f} | {ms / base:.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
