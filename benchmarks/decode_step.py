"""Wall time of one decode step of onnxruntime-genai model files in plain onnxruntime sessions, side
by side, and of a chain of online rotations alone: what the rotation's transforms cost per token.

One step: one new token after ``--past`` cached ones (random cache, all positions attended). The
models are loaded once and timed in ``--rounds`` interleaved rounds of ``--steps`` steps (a busy
machine hits them alike), medians reported with every round. ``--chain N`` also times N whole-width
transforms (RotateInputs' online form: Mul, Reshape, MatMul by H_b, MatMul by H_a^T, Shape,
Reshape) chained alone at the same decode shape, for the width of the first model's hidden state.

    python benchmarks/decode_step.py NOROT/model.onnx ROTATED/model.onnx [--threads 1] [--no-spin] [--chain 121]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's passes

from passes.rotate import RotateInputs  # noqa: E402


def options(threads: int, spin: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def decode_feeds(model: onnx.ModelProto, past: int) -> dict[str, np.ndarray]:
    feeds = {"input_ids": np.array([[42]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
    rng = np.random.default_rng(0)
    for value in model.graph.input:
        if value.name.startswith("past_key_values"):
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            feeds[value.name] = (0.1 * rng.standard_normal((1, dims[1], past, dims[3] or 64))).astype(np.float32)
    return feeds


def chain(width: int, count: int) -> onnx.ModelProto:
    """``count`` layers of the width's whole-width rotation, each followed by an identity MatMul that
    RotateInputs turns: the pass's own online transforms, chained, with the layers removed."""
    nodes, inits, x = [], [], "x"
    for k in range(count):
        inits.append(numpy_helper.from_array(np.eye(width, dtype=np.float32), f"W{k}"))
        nodes.append(helper.make_node("Relu", [x], [f"a{k}"]))  # not a linear producer: an online transform
        nodes.append(helper.make_node("MatMul", [f"a{k}", f"W{k}"], [f"y{k}"]))
        x = f"y{k}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             ["B", "S", width])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["B", "S", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    turned = RotateInputs(whole=True).call(model).model
    rotated = {node.output[0]: node.input[0] for node in turned.graph.node if node.op_type == "MatMul"
               and node.input[1].startswith("W")}  # each layer's output <- its rotated input: drop the layers
    for node in turned.graph.node:
        node.input[:] = [rotated.get(name, name) for name in node.input]
    keep = [n for n in turned.graph.node if not (n.op_type == "MatMul" and n.input[1].startswith("W"))]
    del turned.graph.node[:]
    turned.graph.node.extend(keep)
    turned.graph.output[0].name = rotated[x]
    weights = {init.name for init in inits}  # the identity weights, now unread
    kept = [init for init in turned.graph.initializer if init.name not in weights]
    del turned.graph.initializer[:]
    turned.graph.initializer.extend(kept)
    return turned


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--past", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--no-spin", action="store_true", help="session.intra_op.allow_spinning 0")
    parser.add_argument("--chain", type=int, default=0, help="also time this many online transforms alone")
    args = parser.parse_args()
    so = options(args.threads, not args.no_spin)
    runs = {}
    for path in args.models:
        header = onnx.load(str(path), load_external_data=False)
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        runs[str(path)] = (session, decode_feeds(header, args.past), [session.get_outputs()[0].name])
    if args.chain:
        header = onnx.load(str(args.models[0]), load_external_data=False)
        width = next(int(i.dims[0]) for i in header.graph.initializer if i.name.endswith("layernorm.weight"))
        model = chain(width, args.chain)
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(1).standard_normal((1, 1, width)).astype(np.float32)
        runs[f"{args.chain} online transforms alone (width {width})"] = (session, {"x": x}, None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (session, feeds, outputs) in runs.items():
            for _ in range(20):
                session.run(outputs, feeds)
            start = time.perf_counter()
            for _ in range(args.steps):
                session.run(outputs, feeds)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    for name, values in times.items():
        print(f"{name}: {np.median(values):.3f} ms per step (rounds: {', '.join(f'{v:.3f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
