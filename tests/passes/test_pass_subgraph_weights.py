"""PrepareSubgraphs: a body's constants become main-graph initializers, and a dense node reading
an outer activation reads it through an Identity in its body; the outputs are unchanged."""

import numpy as np
import onnx

from onnx_qubo.passes import PrepareSubgraphs
from onnx_qubo.passes.graphs import subgraphs

from graphs import gemm_model, if_model
from helpers_passes import run


def test_body_constants_are_hoisted_and_outer_activations_read_in_the_body():
    model = if_model()
    result = PrepareSubgraphs().call(model)
    assert result.modified
    main = result.model.graph
    assert "W2" in {i.name for i in main.initializer}
    branches = dict(subgraphs(main.node[-1]))
    for branch, dense in (("then_branch", "fc_then"), ("else_branch", "fc_else")):
        body = branches[branch]
        assert "Constant" not in [n.op_type for n in body.node]
        node = next(n for n in body.node if n.name == dense)
        identity = next(n for n in body.node if n.op_type == "Identity")
        assert identity.input[0] == "x" and node.input[0] == identity.output[0]
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x_in": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-6)


def test_a_model_without_bodies_is_returned_as_is():
    model = gemm_model()
    result = PrepareSubgraphs().call(model)
    assert result.modified is False and result.model is model
