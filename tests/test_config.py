"""The typed configuration: defaults, JSON save/load, refusals naming the key, and the CLI's flags
generated from it."""

import json

import click
import pytest

from onnx_qubo.cli import quantize as quantize_command
from onnx_qubo.config import OPTIONS, PerBlock, PerTensor, QuantizeConfig
from onnx_qubo.core.errors import OptionError


def test_json_round_trip_is_byte_stable():
    config = QuantizeConfig.from_flat(bits=4, head_bits=8, granularity=PerBlock(32), symmetric=False, solver="neal",
                                      neal_reads=3, exclude=("fc0",), layer_bits={"fc1": 8}, max_memory=2.5)
    text = config.to_json()
    again = QuantizeConfig.from_json(text)
    assert again == config and again.to_json() == text
    assert json.loads(text)["weights"] == {"bits": 4, "granularity": {"block": 32}, "symmetric": False,
                                               "float_zero_points": False, "head_bits": 8, "small_layers": None}
    assert list(json.loads(text)) == ["weights", "rounding", "activations", "output", "execution", "automatic"]
    assert QuantizeConfig.from_json('{"weights": {"granularity": "tensor"}}').weights.granularity == PerTensor()


@pytest.mark.parametrize("text, message", [
    ('{"weights": {"bits": 9}}', "config: weights.bits must be between 1 and 8, got 9"),
    ('{"weights": {"bitz": 2}}', "config: unknown key 'weights.bitz'"),
    ('{"weight": {}}', "config: unknown key 'weight'"),
    ('{"rounding": {"solver": "gurobi"}}', "config: rounding.solver must be one of"),
    ('{"output": {"format": "ort", "ort_accuracy_level": 7}}', "output.ort_accuracy_level must be 0-4, got 7"),
    ('{"rounding": {"bias": "int32"}}', "rounding.bias int32 needs quantized inputs (activations.dtype"),
    ('{"weights": {"granularity": {"block": 0}}}', "weights.granularity must be at least 1"),
    ('{"execution": {"workers": true}}', "execution.workers must be an integer"),
    ('{"automatic": {"exclude": "fc0"}}', "automatic.exclude must be a list of layer names"),
    ("[1]", "expected an object of sections"),
    ("{", "config: not JSON"),
])
def test_bad_config_files_are_refused_naming_the_key(text, message):
    with pytest.raises(OptionError) as error:
        QuantizeConfig.from_json(text)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_flat_option_is_refused():
    with pytest.raises(OptionError, match="unknown option.*: bitz"):
        QuantizeConfig.from_flat(bitz=2)


def test_every_config_option_is_a_quantize_flag_with_its_default_and_choices():
    params = {param.name: param for param in quantize_command.params if isinstance(param, click.Option)}
    for name, option in OPTIONS.items():
        param = params[name]  # every option has a flag...
        assert option.flag.split("/")[0] in param.opts, name
        default = option.default
        if name == "granularity":
            assert param.default == default.kind.value
            assert list(param.type.choices) == ["channel", "tensor", "block"]
        elif isinstance(default, (tuple, dict)):
            assert param.multiple and param.default == (), name
        elif name == "ort_accuracy_level":  # auto, the config's None
            assert default is None and param.default == "auto"
            assert list(param.type.choices) == ["auto", "0", "1", "2", "3", "4"]
        else:
            assert param.default == default, name
        if hasattr(default, "value"):  # an enum: the same choices
            assert list(param.type.choices) == [member.value for member in type(default)], name
    run_only = {"config_path", "save_config", "calib", "eval_path", "report_path", "speed", "quiet", "verbose",
                "block_size"}
    assert set(params) - set(OPTIONS) == run_only  # ...and every flag but these is a config option
