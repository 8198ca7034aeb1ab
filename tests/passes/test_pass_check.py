"""CheckModel: onnx's full checker, without reading external data."""

import onnx
import pytest

from onnx_qubo.passes import CheckModel

from graphs import gemm_model
from helpers_passes import external


def test_an_invalid_graph_is_rejected():
    model = gemm_model()
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        CheckModel().call(model)


def test_a_valid_graph_passes_unchanged():
    model = gemm_model()
    result = CheckModel().call(model)
    assert result.model is model and result.modified is False


def test_initializers_in_external_data_are_checked_without_reading_their_files():
    model = gemm_model()
    model.graph.initializer[0].CopyFrom(external(model.graph.initializer[0], "nowhere.bin"))
    assert CheckModel().call(model).modified is False  # no file lookup beside the working directory
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        CheckModel().call(model)
