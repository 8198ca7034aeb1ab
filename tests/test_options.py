"""The option vocabulary and the per-layer plan: every bad value named once, by its option."""

from dataclasses import replace

import numpy as np
import pytest

from onnx_qubo.backends.portable import scheme_refusal
from onnx_qubo.config import PerBlock, QuantizeConfig
from onnx_qubo.core.errors import OptionError
from onnx_qubo.core.grid import Granularity, Scheme
from onnx_qubo.core.options import Activations, BiasMode, ScaleMethod
from onnx_qubo.model.discovery import find_dense_layers
from onnx_qubo.plan import make_plan

from graphs import mlp_model


def test_flat_options_turn_strings_into_enums_and_granularity_objects():
    config = QuantizeConfig.from_flat(bits=4, scale="qubo", solver="rtn", granularity="block", block_size=8,
                                      bias="quantize", activations="uint8")
    assert config.rounding.scale is ScaleMethod.QUBO and config.weights.granularity == PerBlock(8)
    assert config.rounding.bias is BiasMode.QUANTIZE and config.activations.dtype is Activations.UINT8
    assert config.rounding.make_solver().name == "rtn" and config.weights.scheme() == Scheme(4, Granularity.BLOCK, 8)
    assert str(config.rounding.scale) == "qubo" and f"{config.rounding.bias}" == "quantize"


@pytest.mark.parametrize("zero", [0, 0.0, np.int64(0), np.float32(0)])
def test_damping_takes_zero_as_a_number_of_any_kind(zero):
    """--damping 0 turns a default ridge off; ``float`` options refuse 0, this one takes it."""
    assert QuantizeConfig.from_flat(damping=zero).rounding.damping == 0.0
    assert QuantizeConfig().rounding.damping is None  # unset: api.quantize resolves it per model


@pytest.mark.parametrize("arguments, options, message", [
    ({"bits": 2.5}, ("bits",), "bits must be an integer, got 2.5"),
    ({"bits": "abc"}, ("bits",), "bits must be an integer, got 'abc'"),
    ({"bits": True}, ("bits",), "bits must be an integer"),
    ({"bits": 9}, ("bits",), "bits must be between 1 and 8, got 9"),
    ({"layer_bits": {"fc0": 0}}, ("layer_bits",), "layer_bits must be between 1 and 8"),
    ({"scale": "best"}, ("scale",), "scale must be one of auto, mse, minmax, qubo, fit, got 'best'"),
    ({"damping": -0.01}, ("damping",), "damping must be a number of at least 0, got -0.01"),
    ({"damping": float("inf")}, ("damping",), "damping must be a number of at least 0, got inf"),
    ({"granularity": "row"}, ("granularity",), "granularity must be one of channel, tensor, block"),
    ({"solver": "gurobi"}, ("solver",), "solver must be one of"),
    ({"seed": 1.5}, ("seed",), "seed must be an integer"),
    ({"bias": "int32"}, ("bias", "activations"), "bias int32 needs quantized inputs (activations int8 or uint8)"),
    ({"bias": "quantize", "bias_correction": True}, ("bias_correction", "bias"), "bias_correction re-fits"),
    ({"granularity": "block"}, ("granularity", "block_size"), "block_size goes with granularity block"),
    ({"bits": 2, "symmetric": False, "activations": "int8"}, ("symmetric", "granularity", "activations"),
     "onnxruntime 1.32 fuses them into QGemm"),
    ({"auto_scheme": True, "format": "ort"}, ("auto_scheme", "format"), "format ort serves only some of them"),
    ({"ort_accuracy_level": 4}, ("ort_accuracy_level", "format"), "applies to format ort weight-only layers"),
])
def test_bad_options_are_refused_in_the_api_s_terms(arguments, options, message):
    with pytest.raises(OptionError) as error:
        QuantizeConfig.from_flat(**arguments)
    assert error.value.options == options
    assert message in str(error.value)
    rendered = error.value.render({name: f"--{name.replace('_', '-')}" for name in options})
    assert all(f"--{name.replace('_', '-')}" in rendered for name in options)  # a front end names its flags


def test_option_error_leaves_braces_that_name_no_option_alone():
    error = OptionError("{bits} got {'x': 1} and {other}", "bits")
    assert error.render({"bits": "--bits"}) == "--bits got {'x': 1} and {other}"


def test_portable_form_refuses_only_the_scheme_onnxruntime_cannot_load():
    assert scheme_refusal(Scheme(2, symmetric=False), quantized_inputs=True)
    assert scheme_refusal(Scheme(2, Granularity.BLOCK, 4, symmetric=False), quantized_inputs=True) is None
    assert scheme_refusal(Scheme(2, symmetric=False), quantized_inputs=False) is None
    assert scheme_refusal(Scheme(4, symmetric=False), quantized_inputs=True) is None


def test_plan_resolves_bits_and_bias_per_layer():
    model = mlp_model()
    layers, _ = find_dense_layers(model)
    plan = make_plan(QuantizeConfig.from_flat(bits=2, layer_bits={"fc1": 8}, bias="quantize"), layers)
    assert [p.scheme.bits for p in plan.layers] == [2, 8]
    assert all(p.bias is BiasMode.QUANTIZE and p.variables == p.layer.shape[1] + 1 for p in plan.layers)
    assert [p.stem for p in plan.layers] == ["fc0", "fc1"]

    no_bias = replace(layers[0], bias=None, bias_name=None)  # a bias the layer cannot replace
    assert make_plan(QuantizeConfig.from_flat(bias="quantize"), [no_bias]).layers[0].bias is BiasMode.FLOAT

    with pytest.raises(OptionError, match="names no quantized dense layer: nope"):
        make_plan(QuantizeConfig.from_flat(layer_bits={"nope": 4}), layers)
