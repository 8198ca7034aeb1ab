"""Replace the tensor shapes an exporter declared by the ones shape inference finds.

Some exporters declare shapes that are wrong (ddddocr's CRNN declares a rank-2 output that is
rank 3): the model passes onnx's checker at its own opset only because shape inference cannot
see far enough there; once the opset is raised, inference sees the real rank and the full check
fails. Shapes of intermediate tensors (``value_info``) are optional annotations and are dropped
where inference can tell them; graph outputs keep their element types and get the inferred
shapes. A tensor inference cannot reach (behind an op it does not know: onnxruntime's contrib
ops) keeps its declared shape, which runtimes and tools downstream read. Nothing onnxruntime
computes changes.
"""

from __future__ import annotations

import logging

import onnx

from .base import PassResult, copy_model
from .graphs import all_graphs

log = logging.getLogger(__name__)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's shape inference (``strict_mode=False``: nodes of domains it does not know, such as
    onnxruntime's ``com.microsoft`` contrib ops, are passed over) that tolerates an exporter's
    wrong declarations: when the declared shapes contradict it (onnxruntime-genai's builder
    declares a Constant's ``[1]`` output as rank 0), it runs again without the declared
    intermediate shapes (``value_info``), then also without the outputs' shapes; when even that
    fails, ``model`` is returned as it is (its declared shapes are all that is known). ``tensor_types``
    adds the declared types of the tensors inference cannot reach."""
    for k in range(3):  # as declared; without value_info; without the outputs' shapes too
        attempt = model if k == 0 else _undeclared(model, outputs=k == 2)
        try:
            return onnx.shape_inference.infer_shapes(attempt, strict_mode=False)
        except onnx.shape_inference.InferenceError as exc:
            log.info("shape inference failed%s: %s", " (declared shapes dropped)" if k else "", exc)
    return model


def tensor_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The type (element type and shape) of every tensor of ``model`` and its If/Loop/Scan bodies
    that ``infer_shapes`` tells, and the declared one of a tensor it cannot reach (behind an op it
    does not know)."""
    types: dict[str, onnx.TypeProto] = {}
    for source in (model, infer_shapes(model)):  # inferred types replace declared ones...
        for graph in all_graphs(source.graph):
            for info in [*graph.input, *graph.value_info, *graph.output]:
                kind = info.type
                if kind.HasField("tensor_type") and (kind.tensor_type.HasField("shape") or info.name not in types):
                    types[info.name] = kind  # ...where inference knows the shape (not behind a data-dependent Reshape)
    return types


def _undeclared(model: onnx.ModelProto, outputs: bool) -> onnx.ModelProto:
    """A copy of ``model`` without ``value_info`` (and the outputs' shapes if ``outputs``)."""
    source = model.graph
    graph = onnx.GraphProto(name=source.name, node=source.node, input=source.input, output=source.output,
                            initializer=source.initializer, sparse_initializer=source.sparse_initializer)
    if outputs:
        for output in graph.output:
            if output.type.HasField("tensor_type"):
                output.type.tensor_type.ClearField("shape")
    return onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions,
                           graph=graph)


class ReinferDeclaredShapes:
    def call(self, model: onnx.ModelProto) -> PassResult:
        out = copy_model(model)
        del out.graph.value_info[:]
        for output in out.graph.output:
            if output.type.HasField("tensor_type"):
                output.type.tensor_type.ClearField("shape")
        inferred = infer_shapes(out)
        reached = {info.name for info in inferred.graph.value_info if info.type.tensor_type.HasField("shape")}
        produced = {name for node in inferred.graph.node for name in node.output}
        del inferred.graph.value_info[:]
        inferred.graph.value_info.extend(info for info in model.graph.value_info  # behind an op inference skips
                                         if info.name in produced and info.name not in reached)
        for declared, output in zip(model.graph.output, inferred.graph.output):
            if output.type.HasField("tensor_type") and not output.type.tensor_type.HasField("shape"):
                output.type.CopyFrom(declared.type)  # behind an op inference does not know: as declared
        return PassResult(inferred, modified=True)
