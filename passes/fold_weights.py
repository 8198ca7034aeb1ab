"""Turn weights that exporters hide behind nodes into plain initializers, without changing what
the model computes.

- ``Constant`` nodes of the main graph holding a tensor become initializers of the same name
  (some exporters keep every weight in one).
- A chain of layout or type nodes (``Transpose``, ``Reshape``, ``Cast``, ``Identity``,
  ``Squeeze``, ``Unsqueeze``, ``Flatten``) from an initializer to the weight input of a dense
  node (``Gemm``, ``MatMul``, ``Conv``) is evaluated once and replaced by one initializer: FP16
  weights cast to float, weights stored transposed. Only chains whose every tensor is read by
  the next node alone are folded, so no shared tensor is duplicated.
- The same for a chain into the table input (0) of a ``Gather``: a tied LM head, whose
  embedding lookup reads ``Transpose(lm_head weight)`` (onnxruntime-genai's builder), gets the
  table as an initializer of its own, so the head's weight has one reader and is quantized, and
  the table stays float or is quantized as a table (``--embeddings``).

The values are computed by onnx's reference evaluator on the chain alone, so they are exactly
what the chain computes.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data
from onnx.reference import ReferenceEvaluator

from .base import PassResult, copy_model
from .graphs import TensorReader, read_in_proto

log = logging.getLogger(__name__)

CHAIN_OPS = {"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
DENSE_OPS = {"Gemm", "MatMul", "Conv"}
DEFAULT_DOMAINS = ("", "ai.onnx")


class FoldConstantWeights:
    """``read``: how to read a chain's initializers whose values may be in external data files."""

    def __init__(self, read: TensorReader = read_in_proto) -> None:
        self.read = read

    def call(self, model: onnx.ModelProto) -> PassResult:
        nodes = list(model.graph.node)
        constants = [i for i, n in enumerate(nodes) if _is_tensor_constant(n)]
        chains = _weight_chains(model.graph, {nodes[i].output[0] for i in constants})
        if not constants and not chains:
            return PassResult(model, modified=False)
        out = copy_model(model)
        graph = out.graph
        for i in constants:
            graph.initializer.append(_named(helper.get_attribute_value(nodes[i].attribute[0]), nodes[i].output[0]))
        folded = set(constants)
        initializers = {init.name: init for init in graph.initializer}
        sources = set()
        for chain in chains:
            value = _evaluate([nodes[i] for i in chain], initializers, out, self.read)
            graph.initializer.append(numpy_helper.from_array(value, nodes[chain[-1]].output[0]))
            folded |= set(chain)
            sources.add(nodes[chain[0]].input[0])
            log.info("folded %s into the weight '%s'", " -> ".join(nodes[i].op_type for i in chain),
                     nodes[chain[-1]].output[0])
        kept = [node for i, node in enumerate(graph.node) if i not in folded]
        del graph.node[:]
        graph.node.extend(kept)
        still_read = {name for n in kept for name in n.input} | {v.name for v in graph.output}
        unread = {s for s in sources if s not in still_read and not _read_in_subgraph(graph, s)}
        remaining = [init for init in graph.initializer if init.name not in unread]
        del graph.initializer[:]
        graph.initializer.extend(remaining)
        return PassResult(out, modified=True)


def _named(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copied = onnx.TensorProto()
    copied.CopyFrom(tensor)
    copied.name = name
    return copied


def _is_tensor_constant(node: onnx.NodeProto) -> bool:
    return (node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.attribute) == 1
            and node.attribute[0].name == "value")


def _weight_chains(graph: onnx.GraphProto, constants: set[str]) -> list[list[int]]:
    """Chains of CHAIN_OPS nodes (indices, in order) from a constant to the weight input (1)
    of a dense node or the table input (0) of a Gather."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    known = {init.name for init in graph.initializer} | constants
    chains = []
    for node in graph.node:
        if node.domain not in DEFAULT_DOMAINS or len(node.input) < 2 or node.op_type not in [*DENSE_OPS, "Gather"]:
            continue
        chain: list[int] = []
        tensor = node.input[0 if node.op_type == "Gather" else 1]
        while tensor in producers and tensor not in known:
            producer = graph.node[producers[tensor]]
            if (producer.op_type not in CHAIN_OPS or producer.domain not in DEFAULT_DOMAINS
                    or readers.get(tensor) != 1 or tensor in graph_outputs
                    or not all(name in known for name in producer.input[1:] if name)):
                break  # not a layout node, a shared tensor, or e.g. a Reshape whose shape is computed
            chain.insert(0, producers[tensor])
            tensor = producer.input[0]
        if chain and tensor in known:
            chains.append(chain)
    return chains


def _evaluate(chain: list[onnx.NodeProto], initializers: dict[str, onnx.TensorProto],
              model: onnx.ModelProto, read: TensorReader) -> np.ndarray:
    """The chain's output, computed by onnx's reference evaluator on the chain alone."""
    inputs = [_loaded(initializers[name], model, read) for n in chain for name in n.input if name in initializers]
    graph = helper.make_graph(chain, "chain", [], [onnx.ValueInfoProto(name=chain[-1].output[0])],
                              list({i.name: i for i in inputs}.values()))
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return np.asarray(ReferenceEvaluator(sub).run(None, {})[0])  # type: ignore[index]  # a list of outputs


def _loaded(tensor: onnx.TensorProto, model: onnx.ModelProto, read: TensorReader) -> onnx.TensorProto:
    """``tensor`` with its values in the proto (itself when they already are)."""
    if not uses_external_data(tensor):
        return tensor
    return numpy_helper.from_array(read(tensor, model), tensor.name)


def _read_in_subgraph(graph: onnx.GraphProto, name: str) -> bool:
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                if any(name in n.input for n in sub.node) or _read_in_subgraph(sub, name):
                    return True
    return False
