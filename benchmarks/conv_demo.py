"""QUBO rounding of the Conv layers of models/mnist_cnn.onnx, end to end, before the pipeline
knows Conv: patch Grams streamed over the calibration images (onnx_qubo.patches), one
LayerProblem per group solved by the package's solvers, lowered to DequantizeLinear -> Conv.

    python benchmarks/conv_demo.py [--bits 2 3 4] [--solvers rtn fast]

Only the Conv weights are quantized (per output channel, symmetric, ``mse`` scale per group,
float bias); the Gemm layers stay float, so the accuracy shows the Conv layers' effect alone.
Prints a Markdown table: per bit width and solver, the summed QUBO cost of the Conv layers
and the test accuracy (onnxruntime, default and disabled optimization levels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_qubo.grid import IntegerGrid, Scheme
from onnx_qubo.patches import ConvGeometry, PatchGram, flatten_weight, unflatten_weight
from onnx_qubo.qubo import build_problem
from onnx_qubo.runtime import DEFAULT, NONE, make_session
from onnx_qubo.scales import choose_scales
from onnx_qubo.solvers import SOLVERS

MODELS = Path(__file__).resolve().parent.parent / "models"


def conv_statistics(model: onnx.ModelProto, images: np.ndarray) -> dict[str, tuple[ConvGeometry, np.ndarray]]:
    """Conv weight name -> (geometry, per-group Gram of its input patches [groups, f, f])."""
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv" and node.input[1] in weights]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(onnx.ValueInfoProto(name=node.input[0]) for node in convs)
    session = make_session(exposed, NONE, "the CNN with Conv inputs exposed")
    accumulators = {}
    for node in convs:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        accumulators[node.input[1]] = PatchGram(ConvGeometry.from_attributes(attrs, weights[node.input[1]].shape))
    for start in range(0, len(images), 128):
        inputs = session.run([node.input[0] for node in convs], {"image": images[start:start + 128]})
        for node, x in zip(convs, inputs):
            accumulators[node.input[1]].update(x)
    return {name: (acc.geometry, acc.result().gram[:, :-1, :-1]) for name, acc in accumulators.items()}


def quantize_convs(model: onnx.ModelProto, stats, bits: int, solver_name: str) -> tuple[onnx.ModelProto, float]:
    """The model with every Conv weight replaced by DequantizeLinear(axis=0) of INTb integers,
    rounded by the solver; and the summed QUBO cost (mean squared Conv output error)."""
    grid, scheme = IntegerGrid(bits), Scheme(bits)
    storage, opset = grid.storage
    solver = SOLVERS[solver_name]()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {init.name: init for init in out.graph.initializer}
    cost = 0.0
    for node in out.graph.node:
        if node.op_type != "Conv" or node.input[1] not in stats:
            continue
        geometry, grams = stats[node.input[1]]
        flat = flatten_weight(numpy_helper.to_array(inits[node.input[1]]).astype(np.float64), geometry)
        integers, scales = np.zeros(flat.shape, np.int64), np.zeros(len(flat))
        for g in range(geometry.groups):
            rows = geometry.rows_of(g)
            scale = choose_scales("mse", flat[rows], scheme, grams[g]).scale[:, 0]
            problem = build_problem(flat[rows], scale[:, None], 0, 1.0, grid, grams[g])
            choice = solver.solve(problem, seed=0)
            cost += problem.energy(choice)
            integers[rows], scales[rows] = problem.integers(choice), scale
        name = node.input[1]
        out.graph.initializer.remove(inits[name])
        out.graph.initializer.extend([
            numpy_helper.from_array(unflatten_weight(integers, geometry).astype(helper.tensor_dtype_to_np_dtype(storage)),
                                    f"{name}_quantized"),
            numpy_helper.from_array(scales.astype(np.float32), f"{name}_scale")])
        out.graph.node.append(helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale"], [name],
                                               axis=0, name=f"{name}_DequantizeLinear"))
    nodes = sorted(out.graph.node, key=lambda n: n.op_type != "DequantizeLinear")  # DQ first: topological
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.opset_import[0].version = max(out.opset_import[0].version, opset)
    onnx.checker.check_model(out, full_check=True)
    return out, cost


def accuracy(model: onnx.ModelProto, level, images: np.ndarray, labels: np.ndarray) -> float:
    logits = make_session(model, level).run(None, {"image": images})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--solvers", nargs="+", default=["rtn", "fast"], choices=sorted(SOLVERS))
    args = parser.parse_args()
    model = onnx.load(MODELS / "mnist_cnn.onnx")
    calib = np.load(MODELS / "mnist_cnn.calib.npz")["image"]
    evaluation = np.load(MODELS / "mnist_cnn.eval.npz")
    images, labels = evaluation["image"], evaluation["labels"]
    stats = conv_statistics(model, calib)
    print(f"float: {accuracy(model, DEFAULT, images, labels):.4f}; Conv layers (f, groups): "
          + ", ".join(f"{name} ({geo.features}, {geo.groups})" for name, (geo, _) in stats.items()))
    print("\n| bits | solver | Conv QUBO cost | accuracy (default) | accuracy (disabled) |\n|---|---|---|---|---|")
    for bits in args.bits:
        for solver in args.solvers:
            quantized, cost = quantize_convs(model, stats, bits, solver)
            print(f"| {bits} | {solver} | {cost:.5f} | {accuracy(quantized, DEFAULT, images, labels):.4f} "
                  f"| {accuracy(quantized, NONE, images, labels):.4f} |")


if __name__ == "__main__":
    main()
