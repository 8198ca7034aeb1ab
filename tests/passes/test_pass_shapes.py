"""ReinferDeclaredShapes: declared output shapes replaced by the inferred ones."""

import numpy as np
from onnx import TensorProto

from onnx_qubo.passes import CheckModel, ReinferDeclaredShapes, run_passes

from graphs import gemm_model
from helpers_passes import run


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_a_wrongly_declared_output_rank_gets_the_inferred_shape():
    model = gemm_model(relu=False)
    output = model.graph.output[0].type.tensor_type
    output.shape.dim.add().dim_value = 1  # declares [B, 5, 1]; the Gemm computes [B, 5]
    model.graph.value_info.add().name = "stale"
    result = run_passes(model, [ReinferDeclaredShapes(), CheckModel()])
    assert result.modified and len(_dims(result.model.graph.output[0])) == 2
    assert result.model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert not result.model.graph.value_info
    x = np.ones((3, 6), np.float32)
    np.testing.assert_array_equal(run(result.model, {"x": x})[0], run(gemm_model(relu=False), {"x": x})[0])
