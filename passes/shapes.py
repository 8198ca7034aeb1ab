"""Replace the tensor shapes an exporter declared by the ones shape inference finds.

Some exporters declare shapes that are wrong (ddddocr's CRNN declares a rank-2 output that is
rank 3): the model passes onnx's checker at its own opset only because shape inference cannot
see far enough there; once the opset is raised, inference sees the real rank and the full check
fails. Shapes of intermediate tensors (``value_info``) are optional annotations and are dropped;
graph outputs keep their element types and get the inferred shapes. Nothing onnxruntime
computes changes.
"""

from __future__ import annotations

import onnx

from .base import PassResult, copy_model


class ReinferDeclaredShapes:
    def call(self, model: onnx.ModelProto) -> PassResult:
        out = copy_model(model)
        del out.graph.value_info[:]
        for output in out.graph.output:
            if output.type.HasField("tensor_type"):
                output.type.tensor_type.ClearField("shape")
        inferred = onnx.shape_inference.infer_shapes(out, strict_mode=False)
        del inferred.graph.value_info[:]
        return PassResult(inferred, modified=True)
