"""Codes packed at their own width (onnx_qubo/passes/packed_codes.py, ``--pack-codes``):
the unpacking nodes rebuild exactly the integers at onnxruntime's disabled, basic and default levels,
onnxruntime folds them into the storage-type tensor when it loads the model, a packed model computes
the same bits as the unpacked one (main graph, If branches, Conv) and is smaller, and the integers read
back from the file in numpy are the codes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import runs
from onnx import TensorProto, helper, numpy_helper
from test_conv import conv_model

from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.external import tensor_bytes
from onnx_qubo.core.grid import IntegerGrid
from onnx_qubo.core.progress import Progress
from onnx_qubo.graph.runtime import BASIC, DEFAULT, NONE
from onnx_qubo.model.lowering import rewrite
from onnx_qubo.passes import packed_codes
from onnx_qubo.passes.packed_codes import PLANES, code_initializers, pack_planes, packs, read_codes, unpack_nodes
from onnx_qubo.pipeline import calibrate, solve_all
from onnx_qubo.plan import make_plan
from onnx_qubo.studies.contribution import stored_bytes

from graphs import if_model, mlp_model

LEVELS = (NONE, BASIC, DEFAULT)


def session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel, optimized: str | None = None
            ) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def dequantizing_model(integers: np.ndarray, bits: int, grid: IntegerGrid, scale: np.ndarray
                       ) -> tuple[onnx.ModelProto, str]:
    """A model whose only output is DequantizeLinear(axis 0) of ``integers`` packed at ``bits``."""
    initializers: list[onnx.TensorProto] = []
    used: set[str] = set()

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    def constant(base: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value, fresh(base)))
        return initializers[-1].name

    nodes, codes = unpack_nodes("w", integers, bits, grid.qmin, grid.storage[0], constant, fresh)
    nodes.append(helper.make_node("DequantizeLinear", [codes, constant("scale", scale)], ["y"], axis=0))
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(integers.shape))
    graph = helper.make_graph(nodes, "unpack", [], [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    onnx.checker.check_model(model, full_check=True)
    return model, codes


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", sorted(PLANES))
def test_unpacking_rebuilds_the_codes_at_every_level_and_is_folded_on_load(bits, signed, tmp_path):
    """65 codes (not a whole number of bytes in any plane), every grid value present; at the basic
    level onnxruntime keeps only DequantizeLinear reading a folded storage-type initializer."""
    grid = IntegerGrid(bits, signed)
    rng = np.random.default_rng(bits)
    integers = rng.integers(grid.qmin, grid.qmax + 1, size=(5, 13))
    integers.flat[:grid.qmax - grid.qmin + 1] = np.arange(grid.qmin, grid.qmax + 1)
    scale = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    model, codes = dequantizing_model(integers, bits, grid, scale)
    expected = (integers * scale[:, None].astype(np.float64)).astype(np.float32)
    for level in LEVELS:
        np.testing.assert_array_equal(session(model, level).run(None, {})[0], expected)
    np.testing.assert_array_equal(read_codes(model.graph, codes), integers)
    assert sum(plane.size for plane in pack_planes(integers, bits, grid.qmin)) == -(-integers.size // 8) * bits
    session(model, BASIC, str(tmp_path / "basic.onnx"))
    folded = onnx.load(str(tmp_path / "basic.onnx"))
    assert [node.op_type for node in folded.graph.node] == ["DequantizeLinear"]
    stored = {tensor.name: tensor.data_type for tensor in folded.graph.initializer}
    assert stored[folded.graph.node[0].input[0]] == grid.storage[0]


def test_codes_outside_the_grid_are_refused():
    with pytest.raises(ValueError, match="3-bit"):
        pack_planes(np.array([0, 8]), 3, 0)


def test_only_widths_narrower_than_their_type_are_packed():
    assert [b for b in range(1, 9) if packs(b, IntegerGrid(b).storage[0], 10 ** 6)] == [1, 3, 5, 6, 7]
    assert not packs(3, IntegerGrid(3).storage[0], 1000)  # 125 bytes saved: fewer than the nodes take


def dequantize_inputs(path) -> list[np.ndarray]:
    """The integers each DequantizeLinear of a written model reads (its first input), in node order."""
    model = onnx.load(str(path))
    return [read_codes(model.graph, node.input[0]) for node in model.graph.node
            if node.op_type == "DequantizeLinear" and not node.input[0].endswith(("_bias_quantized",))]


def outputs(path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    model = onnx.load(str(path))
    return [session(model, level).run(None, feed)[0] for level in LEVELS]


CASES = {
    "mlp-3": (mlp_model, {"bits": 3}, lambda rng: {"x": rng.standard_normal((64, 8)).astype(np.float32)}),
    "mlp-1-asymmetric": (mlp_model, {"bits": 1, "symmetric": False},
                         lambda rng: {"x": rng.standard_normal((64, 8)).astype(np.float32)}),
    "mlp-6-blocks": (mlp_model, {"bits": 6, "granularity": "block", "block_size": 4},
                     lambda rng: {"x": rng.standard_normal((64, 8)).astype(np.float32)}),
    "if-branches-3": (if_model, {"bits": 3},
                      lambda rng: {"x_in": rng.standard_normal((64, 6)).astype(np.float32), "cond": np.array(True)}),
    "conv-3": (lambda: conv_model(second=True, pads=[1, 1, 1, 1]), {"bits": 3},
               lambda rng: {"x": rng.standard_normal((16, 3, 9, 8)).astype(np.float32)}),
}


@pytest.mark.parametrize("case", CASES)
def test_a_packed_model_computes_the_same_bits_as_the_unpacked_one(case, tmp_path, monkeypatch):
    """Every layer packed, however small (these layers would not be: their nodes outweigh them)."""
    monkeypatch.setattr(packed_codes, "UNPACKING_BYTES", 0)
    make, options, data = CASES[case]
    feed = data(np.random.default_rng(0))
    options = dict(options, head_bits=options["bits"], small_layers=0, calibration=feed, speed=False)
    packed = runs.quantize(make(), tmp_path / "packed.onnx", pack_codes=True, **options)
    plain = runs.quantize(make(), tmp_path / "plain.onnx", **options)  # the default: not packed
    for a, b in zip(outputs(tmp_path / "packed.onnx", feed), outputs(tmp_path / "plain.onnx", feed)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(dequantize_inputs(tmp_path / "packed.onnx"), dequantize_inputs(tmp_path / "plain.onnx")):
        np.testing.assert_array_equal(a, b)
    bits = options["bits"]
    assert all(layer.stored_bits == bits for layer in packed.layers)
    assert any(f"{bits}-bit codes packed at {bits} bits" in note for note in packed.notes)
    assert not any("packed" in note for note in plain.notes)
    assert bits == 1 or any(f"stored in {4 if bits == 3 else 8}-bit integers" in note and "--pack-codes" in note
                            for note in plain.notes)


def test_a_layer_is_packed_where_that_saves_more_than_its_unpacking_nodes_take(tmp_path):
    """At 3 bits a 256 x 128 layer saves 4 KB (packed), its 8-wide head 128 bytes (left in INT4)."""
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    options = dict(bits=3, head_bits=3, small_layers=0, calibration={"x": x}, speed=False, solver="rtn")
    packed = runs.quantize(mlp_model(widths=(256, 128, 8)), tmp_path / "packed.onnx", pack_codes=True, **options)
    runs.quantize(mlp_model(widths=(256, 128, 8)), tmp_path / "plain.onnx", **options)
    assert [layer.stored_bits for layer in packed.layers] == [3, 4]
    assert any("1 layer of 3-bit codes packed" in note for note in packed.notes)
    assert any("1 layer of 3-bit codes stored in 4-bit" in note and "too small to gain from --pack-codes" in note
               for note in packed.notes)
    saved = (tmp_path / "plain.onnx").stat().st_size - (tmp_path / "packed.onnx").stat().st_size
    assert 256 * 128 // 8 - packed_codes.UNPACKING_BYTES < saved < 256 * 128 // 8


def test_widths_with_a_type_of_their_own_are_written_as_before(tmp_path):
    """2 and 4 bits (as 8): nothing to pack, the same file either way."""
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    for bits in (2, 4):
        runs.quantize(mlp_model(), tmp_path / f"a{bits}.onnx", bits=bits, calibration={"x": x}, speed=False)
        runs.quantize(mlp_model(), tmp_path / f"b{bits}.onnx", bits=bits, calibration={"x": x}, speed=False,
                      pack_codes=True)
        assert (tmp_path / f"a{bits}.onnx").read_bytes() == (tmp_path / f"b{bits}.onnx").read_bytes()


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_bytes_counted_for_a_packed_layer_are_the_written_planes_scales_and_zero_points(symmetric):
    """contribution.stored_bytes (--bits-per-weight's and sensitivity's size) against the tensors the
    rewrite writes: the planes (codes padded to 8), float scales, zero points at their type's 4 bits."""
    model = mlp_model(widths=(256, 130, 8))  # 33,280 codes: packed; 1,040 in the head: not
    x = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    calibrated = calibrate(model, load_dataset({"x": x}, model), Progress())
    config = QuantizeConfig.from_flat(bits=3, granularity="block", block_size=32, symmetric=symmetric,
                                      solver="rtn", damping=0.0, pack_codes=True)
    quantized, _ = solve_all(calibrated, make_plan(config, calibrated.layers), Progress())
    graph = rewrite(calibrated.model, quantized, packed=True).model.graph
    sizes = {tensor.name: tensor_bytes(tensor) for tensor in graph.initializer}
    for q, node in zip(quantized, (n for n in graph.node if n.op_type == "DequantizeLinear")):
        written = sum(sizes[name] for name in [*code_initializers(graph, node.input[0]), *node.input[1:]])
        assert stored_bytes(q, packed=True) == written
    assert [packs(3, q.codes.scheme.grid.storage[0], q.codes.integers.size) for q in quantized] == [True, False]
