"""--small-layers: below 4 bits the smallest layers (a Conv network's first and depthwise Convs)
stay at 8 bits while together they hold at most a share of the weights; layers of one size all or
none, the output layers aside, a grouped Conv counted once with all its groups."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import runs
from onnx import TensorProto, helper, numpy_helper
from test_conv import conv_model

from onnx_qubo.api import _resolved
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.errors import OptionError
from onnx_qubo.model.discovery import find_dense_layers, output_layers
from onnx_qubo.model.groups import split_groups
from onnx_qubo.plan import make_plan, small_layers

LM = Path(__file__).resolve().parents[1] / "models" / "tiny_lm" / "model.onnx"
SHAPES = {"a": (8, 8), "b": (8, 8), "c": (8, 64), "d": (64, 64), "head": (64, 4)}  # 64 + 64 + 512 + 4096 + 256


def _chain() -> onnx.ModelProto:
    """x [B, 8] -> a -> Relu -> b -> Relu -> c -> Relu -> d -> Relu -> head -> y (MatMuls)."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for name, shape in SHAPES.items():
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32),
                                             f"W_{name}"))
        nodes.append(helper.make_node("MatMul", [x, f"W_{name}"], [f"{name}_out"], name=name))
        x = f"{name}_out"
        if name != "head":
            nodes.append(helper.make_node("Relu", [x], [f"{name}_relu"]))
            x = f"{name}_relu"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _small(model: onnx.ModelProto, **options: object) -> list[str]:
    layers = find_dense_layers(model)[0]
    return small_layers(QuantizeConfig.from_flat(options), layers, output_layers(model, layers))


def test_the_smallest_layers_are_taken_while_their_share_allows_and_a_size_all_or_none():
    model = _chain()  # 4,992 weights: a and b 64 each, c 512
    assert _small(model, bits=2, small_layers=0.02) == []  # 99.8 weights: a alone would fit, not a and b
    assert _small(model, bits=2, small_layers=0.03) == ["a", "b"]
    assert _small(model, bits=2, small_layers=0.15) == ["a", "b", "c"]
    assert _small(model, bits=2, small_layers=1.0) == ["a", "b", "c", "d"]  # never the output layer


def test_the_default_share_applies_below_four_bits_and_a_given_one_below_eight():
    model = _chain()
    assert _small(model, bits=2) == _small(model, bits=3) == ["a", "b"]
    assert _small(model, bits=4) == []
    assert _small(model, bits=3, small_layers=0) == []
    assert _small(model, bits=4, small_layers=0.03) == ["a", "b"]
    assert _small(model, bits=8, small_layers=0.5) == []


def test_small_layers_get_eight_bits_unless_layer_bits_names_them():
    model = _chain()
    layers = find_dense_layers(model)[0]
    config = QuantizeConfig.from_flat(bits=2, layer_bits={"b": 3})
    assert small_layers(config, layers, ["head"]) == ["a"]  # b keeps the width --layer-bits gives it
    plan = make_plan(config, layers, ["head"], ["a", "b"])  # and make_plan itself puts --layer-bits last
    assert {p.layer.name: p.scheme.bits for p in plan.layers} == {"a": 8, "b": 3, "c": 2, "d": 2, "head": 4}
    assert config.widths == {2, 3, 4, 8}


def test_a_grouped_conv_is_one_layer_of_all_its_groups_weights():
    model = conv_model(channels=(4, 8), group=4, second=True)  # depthwise-like: 8 x 1 x 3 x 3 = 72; conv2 4 x 8 = 32
    layers = split_groups(find_dense_layers(model)[0])  # as calibration hands them to the plan
    assert len([layer for layer in layers if layer.owner == "conv"]) == 4
    config = QuantizeConfig.from_flat(bits=2, small_layers=0.7)  # 72 of 104 weights: conv fits, conv2 is the head
    assert small_layers(config, layers, ["conv2"]) == ["conv"]
    assert small_layers(QuantizeConfig.from_flat(bits=2, small_layers=0.6), layers, ["conv2"]) == []


def test_a_language_model_keeps_its_layers_at_bits_unless_the_share_is_given():
    """Its defaults are those measured on SmolLM2 (docs/llm.md), where the k/v projections would
    qualify at 5%."""
    lm = onnx.load(LM)
    assert _resolved(QuantizeConfig.from_flat(bits=3), lm).weights.small_share == 0.0
    assert _resolved(QuantizeConfig.from_flat(bits=3, small_layers=0.05), lm).weights.small_share == 0.05
    assert _resolved(QuantizeConfig.from_flat(bits=3), _chain()).weights.small_share == 0.05


def test_the_share_is_checked_and_refused_with_the_automatic_choice():
    for bad in (-0.1, 1.5, "much"):
        with pytest.raises(OptionError, match="small_layers"):
            QuantizeConfig.from_flat(bits=2, small_layers=bad)
    with pytest.raises(OptionError, match="small_layers"):
        QuantizeConfig.from_flat(bits=2, small_layers=0.05, bits_per_weight=3.0)
    assert QuantizeConfig.from_flat(bits=2, bits_per_weight=3.0).widths == {2}


def test_the_report_names_the_small_layers_and_the_written_model_holds_them(tmp_path):
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    report = runs.quantize(_chain(), tmp_path / "q.onnx", bits=2, calibration={"x": x}, speed=False)
    assert [(layer.name, layer.bits) for layer in report.layers] == [("a", 8), ("b", 8), ("c", 2), ("d", 2),
                                                                     ("head", 4)]
    assert any("2 small layers at 8 bits" in note and "--small-layers" in note for note in report.notes)
    stored = {i.name: i.data_type for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    assert stored["W_a_quantized"] in (TensorProto.INT8, TensorProto.UINT8)
    assert stored["W_c_quantized"] in (TensorProto.INT2, TensorProto.UINT2)
    assert report.evaluation.default_vs_unoptimized < 1e-5 and report.evaluation.basic_vs_unoptimized < 1e-5
    off = runs.quantize(_chain(), tmp_path / "off.onnx", bits=2, small_layers=0, calibration={"x": x}, speed=False)
    assert [layer.bits for layer in off.layers] == [2, 2, 2, 2, 4]
    assert not any("small layer" in note for note in off.notes)


def test_a_small_depthwise_conv_is_written_at_eight_bits_and_checked_at_every_level(tmp_path):
    """A grouped Conv at 8 bits in blocks beside a 2-bit Conv: its codes are stored as INT8/UINT8,
    and the default and basic levels give what onnxruntime gives with optimizations disabled."""
    model = conv_model(channels=(4, 8), group=4, second=True, pads=[1, 1, 1, 1])
    x = np.random.default_rng(3).standard_normal((24, 4, 9, 8)).astype(np.float32)
    report = runs.quantize(model, tmp_path / "q.onnx", bits=2, small_layers=0.7, granularity="block", block_size=4,
                           head_bits=2, calibration={"x": x}, speed=False)
    assert [(layer.name, layer.bits) for layer in report.layers] == [("conv", 8), ("conv2", 2)]
    stored = {i.name: i.data_type for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    assert stored["W_quantized"] in (TensorProto.INT8, TensorProto.UINT8)
    assert stored["W2_quantized"] in (TensorProto.INT2, TensorProto.UINT2)
    assert report.evaluation.default_vs_unoptimized < 1e-5 and report.evaluation.basic_vs_unoptimized < 1e-5
