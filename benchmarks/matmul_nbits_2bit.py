"""Speed and weight bytes of onnxruntime's 2-bit MatMulNBits against its 4-bit one and a float
MatMul, per block size and accuracy level, built by ``backends/ort.matmul_nbits`` from the same
2-bit codes (what ``--format ort`` writes).

Why: ``--format ort`` writes 2-bit codes into the 2-bit kernel only where onnxruntime has a
prepacked CPU kernel for it (``accuracy_level`` 4, blocks of 32-128; backends/ort.py), else into
the 4-bit one. Ratios are against the float MatMul measured in the same run (the machine is
shared: the load average is printed). A kernel written with ``allow_slow`` has no prepacked
implementation and dequantizes its whole weight on every run.

    python benchmarks/matmul_nbits_2bit.py [--rows 2048] [--cols 2048] [--seconds 1]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnxruntime as ort
from matmul_nbits_zero_points import milliseconds  # this folder: the same timing loop
from onnx import TensorProto, helper, numpy_helper

from onnx_qubo.backends.ort import OrtForm, matmul_nbits
from onnx_qubo.core.grid import Granularity, GroupScales, Scheme, WeightCodes


def two_bit_codes(n: int, f: int, block: int, rng: np.random.Generator) -> WeightCodes:
    """Random symmetric 2-bit codes [n, f] with a scale per block of ``block`` inputs."""
    groups = -(-f // block)
    scales = GroupScales(rng.uniform(0.01, 0.1, (n, groups)), np.zeros((n, groups), np.int64), block)
    return WeightCodes(rng.integers(-2, 2, (n, f)), scales, Scheme(2, Granularity.BLOCK, block))


def model_of(nodes: list, initializers: list, f: int, n: int) -> bytes:
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", f])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="outputs N")
    parser.add_argument("--cols", type=int, default=2048, help="inputs K")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    n, f, rng = args.rows, args.cols, np.random.default_rng(0)
    weight = rng.standard_normal((f, n)).astype(np.float32)
    float_model = model_of([helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(weight, "W")],
                           f, n)
    print(f"onnxruntime {ort.__version__}, weight {n}x{f} (N x K), 2-bit codes, threads: onnxruntime's default, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| kernel | block | accuracy_level | weight bytes | batch 1 ms (x float) | batch 64 ms (x float) |")
    print("|---|---|---|---|---|---|")
    batches = {b: rng.standard_normal((b, f)).astype(np.float32) for b in (1, 64)}
    base = {b: milliseconds(float_model, x, args.seconds) for b, x in batches.items()}
    print(f"| float MatMul (baseline) | - | - | {weight.nbytes:,} | {base[1]:.3f} (1.00) | {base[64]:.3f} (1.00) |")
    for block in (16, 32, 64, 128, 256):
        codes = two_bit_codes(n, f, block, rng)
        for bits, level in ((4, 0), (4, 4), (2, 0), (2, 4)):
            form = matmul_nbits(codes, None, "x", "y", str, accuracy_level=level, kernel_bits=bits, block_size=block)
            slow = isinstance(form, str)
            if slow:
                form = matmul_nbits(codes, None, "x", "y", str, accuracy_level=level, kernel_bits=bits,
                                    block_size=block, allow_slow=True)
            assert isinstance(form, OrtForm)
            model = model_of(form.nodes, form.initializers, f, n)
            stored = sum(numpy_helper.to_array(t).nbytes for t in form.initializers)
            times = {b: milliseconds(model, x, args.seconds) for b, x in batches.items()}
            label = f"{bits}-bit MatMulNBits" + (" (no prepacked kernel: refused)" if slow else "")
            print(f"| {label} | {block} | {level} | {stored:,} | {times[1]:.3f} ({times[1] / base[1]:.2f}) | "
                  f"{times[64]:.3f} ({times[64] / base[64]:.2f}) |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
