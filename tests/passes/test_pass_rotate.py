"""RotateInputs: every rotatable layer's input space turned by a random-sign block Hadamard
transform, folded into the producer where the algebra allows, else an online transform; the
rotated model computes what the original does at every onnxruntime level."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnx_qubo.passes import RotateInputs, UnsupportedModel, online_rotations
from onnx_qubo.passes.rotate import hadamard, hadamard_of_order

from helpers_passes import external, floats

RNG = np.random.default_rng(0)
LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          ort.GraphOptimizationLevel.ORT_DISABLE_ALL]


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, initializers, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feeds: dict, level) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def assert_same_outputs(original: onnx.ModelProto, rotated: onnx.ModelProto, feeds: dict) -> None:
    for level in LEVELS:
        for a, b in zip(_run(original, feeds, level), _run(rotated, feeds, level)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def matmul_nd() -> onnx.ModelProto:
    """x [B, T, 48] @ W: blocks of 16 (48 = 16 x 3)."""
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_init("W", 48, 5)],
                  [floats("x", ["B", "T", 48])], [floats("y", ["B", "T", 5])])


def gemm(trans_b: int) -> onnx.ModelProto:
    w = _init("W", 6, 32) if trans_b else _init("W", 32, 6)
    return _model([helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=trans_b, alpha=0.5, beta=2.0)],
                  [w, _init("C", 6)], [floats("x", ["B", 32])], [floats("y", ["B", 6])])


def mlp() -> onnx.ModelProto:
    """MatMul+Add -> Relu -> MatMul+Add: both layers get an online transform."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    return _model(nodes, [_init("W1", 64, 32), _init("b1", 32), _init("W2", 32, 10), _init("b2", 10)],
                  [floats("x", ["B", 64])], [floats("y", ["B", 10])])


def chain(producer: str) -> onnx.ModelProto:
    """A linear producer feeding one layer only: its rotation folds into the producer."""
    if producer == "matmul_add":
        first = [helper.make_node("MatMul", ["x", "P"], ["m"]), helper.make_node("Add", ["b", "m"], ["h"])]
        inits = [_init("P", 16, 32), _init("b", 1, 32)]
    else:
        first = [helper.make_node("Gemm", ["x", "P", "b"], ["h"], transB=1)]
        inits = [_init("P", 32, 16), _init("b", 1)]
    return _model(first + [helper.make_node("MatMul", ["h", "W"], ["y"])], inits + [_init("W", 32, 8)],
                  [floats("x", ["B", 16])], [floats("y", ["B", 8])])


def shared_input() -> onnx.ModelProto:
    """x read by two layers and a residual Add: one online transform for the two layers."""
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"]), helper.make_node("MatMul", ["x", "Wk"], ["k"]),
             helper.make_node("Add", ["q", "x"], ["r"]), helper.make_node("Mul", ["r", "k"], ["y"])]
    return _model(nodes, [_init("Wq", 32, 32), _init("Wk", 32, 32)], [floats("x", ["B", 32])],
                  [floats("y", ["B", 32])])


def _feeds(model: onnx.ModelProto) -> dict:
    shapes = {"x": [3, 7]}
    first = model.graph.input[0]
    width = first.type.tensor_type.shape.dim[-1].dim_value
    rank = len(first.type.tensor_type.shape.dim)
    return {"x": RNG.standard_normal([*shapes["x"][:rank - 1], width]).astype(np.float32)}


@pytest.mark.parametrize("make", [matmul_nd, lambda: gemm(0), lambda: gemm(1), mlp, shared_input],
                         ids=["matmul_nd", "gemm", "gemm_transB", "mlp", "shared_input"])
def test_online_rotation_computes_the_same_outputs_at_every_level(make):
    model = make()
    before = model.SerializeToString()
    result = RotateInputs(seed=3).call(model)
    assert result.modified and model.SerializeToString() == before  # the input is untouched
    rotated = result.model
    online = online_rotations(rotated)
    matmuls = [n for n in rotated.graph.node if n.name in online and n.op_type == "MatMul"]
    layers = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(matmuls) == len({n.input[0] for n in layers})  # one transform per input tensor
    for node in layers:  # every layer's weight changed, and now reads a rotated input
        assert not np.allclose(_weight(model, node.input[1]), _weight(rotated, node.input[1]))
    onnx.checker.check_model(rotated, full_check=True)
    assert_same_outputs(model, rotated, _feeds(model))


@pytest.mark.parametrize("producer", ["matmul_add", "gemm"])
def test_a_linear_producer_takes_the_rotation_and_nothing_is_inserted_before_its_reader(producer):
    model = chain(producer)
    rotated = RotateInputs().call(model).model
    last = rotated.graph.node[-1]
    assert last.op_type == "MatMul" and list(last.input) == ["h", "W"]  # no transform before it
    online = [n for n in rotated.graph.node if n.name in online_rotations(rotated) and n.op_type == "MatMul"]
    assert len(online) == 1 and online[0].input[0] != "h"  # the graph input's only
    assert_same_outputs(model, rotated, _feeds(model))
    assert not np.allclose(_weight(rotated, "P"), _weight(model, "P"))  # rotated on both sides
    assert not np.allclose(_weight(rotated, "b"), _weight(model, "b"))


def test_the_residual_reader_keeps_the_unrotated_tensor():
    rotated = RotateInputs().call(shared_input()).model
    add = next(n for n in rotated.graph.node if n.op_type == "Add")
    assert list(add.input) == ["q", "x"]
    readers = [n for n in rotated.graph.node if n.op_type == "MatMul" and n.input[1] in ("Wq", "Wk")]
    assert len({n.input[0] for n in readers}) == 1 and readers[0].input[0] != "x"


def test_the_rotation_is_orthogonal_and_the_blocks_fit_the_width():
    h = hadamard(16)
    np.testing.assert_allclose(h @ h.T, np.eye(16), atol=1e-12)
    model = matmul_nd()  # 48 = 16 x 3: blocks of 16 even with a larger maximum
    rotated = RotateInputs(max_block=64).call(model).model
    constant = next(n for n in rotated.graph.node if n.op_type == "Constant")
    assert numpy_helper.to_array(constant.attribute[0].t).shape == (16, 16)
    small = RotateInputs(max_block=4).call(model).model
    constant = next(n for n in small.graph.node if n.op_type == "Constant")
    assert numpy_helper.to_array(constant.attribute[0].t).shape == (4, 4)


@pytest.mark.parametrize("order", [2, 12, 20, 24, 28, 36, 48, 76, 140])
def test_a_hadamard_matrix_of_every_order_paley_and_sylvester_reach_is_orthonormal(order):
    h = hadamard_of_order(order)
    assert h is not None and h.shape == (order, order)
    np.testing.assert_allclose(h @ h.T, np.eye(order), atol=1e-12)
    np.testing.assert_array_equal(np.abs(h) * np.sqrt(order), 1.0)  # +-1 entries: flat, no direction stands out


@pytest.mark.parametrize("order", [3, 6, 9, 18, 172])
def test_no_hadamard_matrix_is_claimed_where_none_is_built(order):
    assert hadamard_of_order(order) is None  # 3, 6, 9, 18: none exists; 172: not from a prime


@pytest.mark.parametrize("make", [matmul_nd, mlp, shared_input], ids=["matmul_nd_48", "mlp", "shared_input"])
def test_the_whole_width_rotation_computes_the_same_outputs_at_every_level(make):
    model = make()
    rotated = RotateInputs(seed=5, max_block=16, whole=True).call(model).model
    online = [n for n in rotated.graph.node if n.name in online_rotations(rotated) and n.op_type == "MatMul"]
    assert len(online) == 2 * len({n.input[0] for n in model.graph.node if n.op_type == "MatMul"})
    onnx.checker.check_model(rotated, full_check=True)
    assert_same_outputs(model, rotated, _feeds(model))


def test_the_whole_width_rotation_mixes_every_input_into_every_output():
    model = matmul_nd()  # 48 = 12 x 4: Paley's order 12 kron Sylvester's 4
    block = RotateInputs(max_block=4).call(model).model
    whole = RotateInputs(max_block=4, whole=True).call(model).model
    constants = [numpy_helper.to_array(n.attribute[0].t) for n in whole.graph.node if n.op_type == "Constant"]
    assert sorted(c.shape for c in constants) == [(4, 4), (12, 12)]
    x = np.eye(48, dtype=np.float32)  # row i: the i-th input alone
    for rotated, reached in ((block, 4), (whole, 48)):
        online = [n for n in rotated.graph.node if n.name in online_rotations(rotated)]
        turned = _model(online, [i for i in rotated.graph.initializer if i.name != "W"], [floats("x", ["B", 48])],
                        [floats(online[-1].output[0], ["B", 48])])
        out = _run(turned, {"x": x}, LEVELS[2])[0]
        assert (np.abs(out) > 1e-6).sum(axis=1).min() == reached
        np.testing.assert_allclose(out @ out.T, np.eye(48), atol=1e-5)  # orthogonal


def convs(rank: int) -> onnx.ModelProto:
    """Conv 3x3 (3 -> 48) -> Relu, read by a padded strided Conv 3x3 (48 -> 8), a Conv 1x1
    (48 -> 5) and a depthwise Conv (group 48, left alone); ``rank`` 3 (Conv1d) or 4 (Conv2d)."""
    k, one, spatial = (3,) * (rank - 2), (1,) * (rank - 2), ["H", "W"][:rank - 2]
    pads = [1] * (2 * (rank - 2))
    nodes = [helper.make_node("Conv", ["x", "W1", "c1"], ["h0"], pads=pads), helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("Conv", ["h", "W2"], ["y"], pads=pads, strides=[2] * (rank - 2)),
             helper.make_node("Conv", ["h", "W3", "c3"], ["z"]),
             helper.make_node("Conv", ["h", "Wd"], ["d"], group=48, pads=pads)]
    inits = [_init("W1", 48, 3, *k), _init("c1", 48), _init("W2", 8, 48, *k), _init("W3", 5, 48, *one),
             _init("c3", 5), _init("Wd", 48, 1, *k)]
    return _model(nodes, inits, [floats("x", ["N", 3, *spatial])],
                  [floats("y", ["N", 8, *spatial]), floats("z", ["N", 5, *spatial]), floats("d", ["N", 48, *spatial])])


@pytest.mark.parametrize("whole", [False, True], ids=["blocks", "whole"])
@pytest.mark.parametrize("rank", [3, 4], ids=["conv1d", "conv2d"])
def test_conv_input_channels_rotate_and_compute_the_same_outputs_at_every_level(rank, whole):
    model = convs(rank)
    assert RotateInputs(whole=whole).call(model).modified is False  # no MatMul: nothing without convs
    rotated = RotateInputs(seed=2, max_block=16, whole=whole, convs=True).call(model).model
    online = [n for n in rotated.graph.node if n.name in online_rotations(rotated)]
    assert sum(n.op_type == "MatMul" for n in online) == (2 if whole else 1)  # one transform for h's two readers
    for name in ("W2", "W3"):  # rotated over their input channels; the first layer (3 channels) and the depthwise not
        assert not np.allclose(_weight(model, name), _weight(rotated, name))
    for name in ("W1", "Wd"):
        np.testing.assert_array_equal(_weight(model, name), _weight(rotated, name))
    depthwise = next(n for n in rotated.graph.node if n.input[1:2] == ["Wd"])
    assert depthwise.input[0] == "h"  # reads the unrotated tensor
    onnx.checker.check_model(rotated, full_check=True)
    x = RNG.standard_normal([2, 3, *[9] * (rank - 2)]).astype(np.float32)
    assert_same_outputs(model, rotated, {"x": x})


def test_every_input_channel_of_a_conv_reaches_every_rotated_channel_with_whole():
    model = convs(4)  # 48 = 12 x 4 with Sylvester blocks up to 4
    rotated = RotateInputs(max_block=4, whole=True, convs=True).call(model).model
    online = [n for n in rotated.graph.node if n.name in online_rotations(rotated)]
    turned = _model(online, [i for i in rotated.graph.initializer if not i.name.startswith(("W", "c"))],
                    [floats("h", ["N", 48, 1, 1])], [floats(online[-1].output[0], ["N", 48, 1, 1])])
    out = _run(turned, {"h": np.eye(48, dtype=np.float32).reshape(48, 48, 1, 1)}, LEVELS[2])[0].reshape(48, 48)
    assert (np.abs(out) > 1e-6).sum(axis=1).min() == 48
    np.testing.assert_allclose(out @ out.T, np.eye(48), atol=1e-5)


def test_transforms_of_the_same_orders_read_one_constant_per_matrix():
    """Three layers 48 wide behind nonlinearities: three online transforms, one H_4 and one H_12."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "W2"], ["h2"]), helper.make_node("Tanh", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "W3"], ["y"])]
    model = _model(nodes, [_init("W1", 48, 48), _init("W2", 48, 48), _init("W3", 48, 5)],
                   [floats("x", ["B", 48])], [floats("y", ["B", 5])])
    rotated = RotateInputs(max_block=4, whole=True).call(model).model
    online = [n for n in rotated.graph.node if n.name in online_rotations(rotated)]
    constants = [n for n in online if n.op_type == "Constant"]
    assert sorted(numpy_helper.to_array(n.attribute[0].t).shape for n in constants) == [(4, 4), (12, 12)]
    assert list(rotated.graph.node[:2]) == constants  # at the head, before every reader
    assert sum(n.op_type == "MatMul" for n in online) == 6
    assert_same_outputs(model, rotated, _feeds(model))


def test_an_odd_width_is_left_alone_and_a_bad_block_is_refused():
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_init("W", 7, 3)],
                   [floats("x", ["B", 7])], [floats("y", ["B", 3])])
    result = RotateInputs().call(model)
    assert result.modified is False and result.model is model
    with pytest.raises(ValueError, match="power of two"):
        RotateInputs(max_block=48)


def test_the_seed_decides_the_signs_deterministically():
    model = mlp()
    a = RotateInputs(seed=1).call(model).model.SerializeToString()
    assert a == RotateInputs(seed=1).call(model).model.SerializeToString()
    assert a != RotateInputs(seed=2).call(model).model.SerializeToString()


def test_weights_in_external_data_come_through_the_reader():
    model = matmul_nd()
    values = numpy_helper.to_array(model.graph.initializer[0])
    model.graph.initializer[0].CopyFrom(external(model.graph.initializer[0]))
    with pytest.raises(UnsupportedModel, match="tensor 'W' refers to external data"):
        RotateInputs().call(model)
    rotated = RotateInputs(read=lambda tensor, owner: values).call(model).model
    assert rotated.graph.initializer[0].HasField("raw_data")



def prenorm_decoder(blocked: bool = False) -> onnx.ModelProto:
    """A pre-norm decoder of width 32 (opset 23 ``RMSNormalization``): embedding -> (norm -> q ->
    Relu -> o, + residual) -> (norm -> up -> Relu -> down, + residual) -> norm -> head. ``blocked``:
    the first residual sum is an output too, so the stream cannot turn as one."""
    ids = helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["B", "T"])
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h0"])]
    inits = [_init("E", 50, 32)]
    for k, n_mid in enumerate((32, 64)):
        inits += [numpy_helper.from_array((1 + 0.3 * RNG.standard_normal(32)).astype(np.float32), f"g{k}"),
                  _init(f"A{k}", 32, n_mid), _init(f"B{k}", n_mid, 32)]
        nodes += [helper.make_node("RMSNormalization", [f"h{k}", f"g{k}"], [f"n{k}"], axis=-1, epsilon=1e-5),
                  helper.make_node("MatMul", [f"n{k}", f"A{k}"], [f"a{k}"]),
                  helper.make_node("Relu", [f"a{k}"], [f"r{k}"]),
                  helper.make_node("MatMul", [f"r{k}", f"B{k}"], [f"b{k}"]),
                  helper.make_node("Add", [f"h{k}", f"b{k}"], [f"h{k + 1}"])]
    inits += [numpy_helper.from_array((1 + 0.3 * RNG.standard_normal(32)).astype(np.float32), "g2"), _init("H", 32, 10)]
    nodes += [helper.make_node("RMSNormalization", ["h2", "g2"], ["n2"], axis=-1, epsilon=1e-5),
              helper.make_node("MatMul", ["n2", "H"], ["logits"])]
    outputs = [floats("logits", ["B", "T", 10])] + ([floats("h1", ["B", "T", 32])] if blocked else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [ids], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("whole", [False, True], ids=["blocks", "whole"])
def test_the_residual_stream_turns_as_one_and_its_norms_gains_move_into_the_layers(whole):
    model = prenorm_decoder()
    rotated = RotateInputs(seed=4, max_block=8, whole=whole, residual=True).call(model).model
    online = [n for n in rotated.graph.node if n.name in online_rotations(rotated) and n.op_type == "MatMul"]
    # the embedding's rows and the two layers after a Relu: no transform after the three norms
    assert len(online) == 3 * (1 + whole)
    norms = [n for n in rotated.graph.node if n.op_type == "RMSNormalization"]
    assert all(np.array_equal(_weight(rotated, n.input[1]), np.ones(32, np.float32)) for n in norms)
    for norm in norms:
        reader = next(n for n in rotated.graph.node if norm.output[0] in n.input)
        assert reader.op_type == "MatMul" and reader.name not in online_rotations(rotated)
    np.testing.assert_array_equal(_weight(rotated, "E"), _weight(model, "E"))  # the table stays: turned online
    onnx.checker.check_model(rotated, full_check=True)
    assert_same_outputs(model, rotated, {"ids": RNG.integers(0, 50, (3, 7))})


def test_without_residual_or_with_a_stream_read_elsewhere_each_norm_keeps_its_gain_and_a_transform_after_it():
    for residual, model in ((False, prenorm_decoder()), (True, prenorm_decoder(blocked=True))):  # off, or blocked
        rotated = RotateInputs(seed=4, max_block=8, residual=residual).call(model).model
        online = [n for n in rotated.graph.node if n.name in online_rotations(rotated) and n.op_type == "MatMul"]
        assert len(online) == 5  # after each of the three norms, and the two layers after a Relu
        for k in range(3):
            np.testing.assert_array_equal(_weight(rotated, f"g{k}"), _weight(model, f"g{k}"))
        assert_same_outputs(model, rotated, {"ids": RNG.integers(0, 50, (3, 7))})


def skip_norm_decoder() -> onnx.ModelProto:
    """The pre-norm decoder as onnxruntime-genai's builder writes it: SimplifiedLayerNormalization,
    then SkipSimplifiedLayerNormalization (com.microsoft) adding each block's output, its bias and
    the residual, whose sum output carries the stream on."""
    ids = helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["B", "T"])
    gains = [numpy_helper.from_array((1 + 0.3 * RNG.standard_normal(32)).astype(np.float32), f"g{k}")
             for k in range(3)]
    inits = [_init("E", 50, 32), *gains, _init("A0", 32, 32), _init("B0", 32, 32), _init("A1", 32, 64),
             _init("B1", 64, 32), _init("c1", 32), _init("H", 32, 10)]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h0"]),
             helper.make_node("SimplifiedLayerNormalization", ["h0", "g0"], ["n0"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n0", "A0"], ["a0"]), helper.make_node("Relu", ["a0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "B0"], ["b0"]),
             helper.make_node("SkipSimplifiedLayerNormalization", ["h0", "b0", "g1", "c1"], ["n1", "", "", "h1"],
                              domain="com.microsoft", epsilon=1e-5),
             helper.make_node("MatMul", ["n1", "A1"], ["a1"]), helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "B1"], ["b1"]),
             helper.make_node("SkipSimplifiedLayerNormalization", ["h1", "b1", "g2"], ["n2"], domain="com.microsoft",
                              epsilon=1e-5),
             helper.make_node("MatMul", ["n2", "H"], ["logits"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [ids], [floats("logits", ["B", "T", 10])], inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def test_a_skip_norm_stream_with_a_bias_turns_as_one():
    model = skip_norm_decoder()
    rotated = RotateInputs(seed=6, max_block=8, whole=True, residual=True).call(model).model
    online = [n for n in rotated.graph.node if n.name in online_rotations(rotated) and n.op_type == "MatMul"]
    assert len(online) == 2 * 3  # the embedding's rows and the two layers after a Relu, two MatMuls each
    assert not np.allclose(_weight(rotated, "c1"), _weight(model, "c1"))  # the bias added into the stream turned
    assert_same_outputs(model, rotated, {"ids": RNG.integers(0, 50, (3, 7))})
