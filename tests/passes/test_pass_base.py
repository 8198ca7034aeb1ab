"""run_passes: the sequence's result, whether it changed the model, and the pass's own errors."""

import onnx
import pytest

from onnx_qubo.passes import (
    CheckModel,
    FoldConstantWeights,
    InsertDequantize,
    PassError,
    PassFailed,
    PrepareSubgraphs,
    QuantizedWeight,
    RaiseOpset,
    ReinferDeclaredShapes,
    UnsupportedModel,
    run_passes,
)

from graphs import gemm_model
from helpers_passes import Broken, GemmLowering, Refuses, int8


def test_run_passes_says_whether_any_pass_changed_the_model():
    model = gemm_model()  # opset 17
    assert run_passes(model, [RaiseOpset(13), CheckModel()]).modified is False
    assert run_passes(model, [RaiseOpset(13), CheckModel()]).model is model
    result = run_passes(model, [RaiseOpset(13), RaiseOpset(21), CheckModel()])
    assert result.modified is True and result.model.opset_import[0].version == 21


def test_a_foreign_failure_is_a_pass_failed_naming_the_pass_with_its_cause():
    with pytest.raises(PassFailed, match="graph pass Broken failed: 'boom'") as caught:
        run_passes(gemm_model(), [RaiseOpset(21), Broken()])
    assert isinstance(caught.value.__cause__, KeyError)
    assert isinstance(caught.value, PassError)


def test_a_pass_error_goes_through_as_raised():
    with pytest.raises(UnsupportedModel, match="^node 'x' cannot be handled$"):
        run_passes(gemm_model(), [Refuses()])


ALL_PASSES = [RaiseOpset(25), CheckModel(), FoldConstantWeights(), PrepareSubgraphs(), ReinferDeclaredShapes(),
              InsertDequantize([QuantizedWeight("W", int8(onnx.numpy_helper.to_array(gemm_model().graph.initializer[0])
                                                          .astype(int) * 0, 1.0), GemmLowering(), 2)])]


@pytest.mark.parametrize("graph_pass", ALL_PASSES, ids=lambda p: type(p).__name__)
def test_every_pass_leaves_its_input_alone(graph_pass):
    model = gemm_model()
    before = model.SerializeToString()
    graph_pass.call(model)
    assert model.SerializeToString() == before
