"""passes/graphs.py: walking bodies, the names a graph uses, fresh names, and reading tensors."""

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_qubo.passes import UnsupportedModel, read_in_proto
from onnx_qubo.passes.graphs import all_graphs, fresh_name, local_names, names_used, outer_reads, subgraphs

from graphs import gemm_model, if_model
from helpers_passes import external


def test_bodies_are_walked_outer_first_and_their_names_are_all_used():
    model = if_model()
    graphs = all_graphs(model.graph)
    assert [g.name for g in graphs] == ["test", "else", "then"]
    assert [name for name, _ in subgraphs(model.graph.node[-1])] == ["else_branch", "then_branch"]
    used = names_used(model.graph)
    assert {"x", "W2", "fc_else", "y_then", "branch"} <= used
    assert "W2" in local_names(graphs[1]) and "x" not in local_names(graphs[1])
    assert outer_reads(graphs[1]) == {"x", "b2"}
    assert fresh_name(used, "x") == "x_1" and fresh_name(used, "x") == "x_2" and "x_2" in used


def test_read_in_proto_reads_values_and_refuses_external_data():
    model = gemm_model()
    weight = model.graph.initializer[0]
    np.testing.assert_array_equal(read_in_proto(weight, model), numpy_helper.to_array(weight))
    with pytest.raises(UnsupportedModel, match="tensor 'W' refers to external data"):
        read_in_proto(external(weight), model)
