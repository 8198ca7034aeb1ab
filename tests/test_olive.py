"""The Olive pass (onnx_qubo/olive_pass.py): an Olive workflow runs the same computation as
``onnx_qubo.api.quantize`` + ``save`` with the same config. Needs the ``olive`` extra (olive-ai
pulls in torch and transformers), which the ``test`` extra leaves out: skipped without it."""

import json
import os
from importlib.util import find_spec
from pathlib import Path

import pytest

if find_spec("olive") is None:  # only its absence skips: a broken install fails below
    pytest.skip("the olive extra is not installed (olive-ai needs torch): pip install 'onnx-qubo[olive]'",
                allow_module_level=True)
os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")  # read when Olive starts: no reports sent or cached

from olive.model import ONNXModelHandler  # noqa: E402
from olive.package_config import OlivePackageConfig  # noqa: E402
from olive.passes.olive_pass import create_pass_from_dict  # noqa: E402
from olive.workflows import run as olive_run  # noqa: E402

from onnx_qubo import OptionError, QuantizeConfig, api  # noqa: E402
from onnx_qubo.olive_pass import PASS_TYPE, QuboQuantization, package_config, quantize_config  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
MODEL, CALIBRATION = MODELS / "mnist_mlp.onnx", MODELS / "mnist_mlp.calib.npz"
TWO_BITS = {"weights": {"bits": 2}}


def workflow(tmp_path: Path, **parameters: object) -> dict:
    """An Olive run config: the MNIST MLP through the onnx-qubo pass alone, on this CPU."""
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(MODEL)},
        "systems": {"local": {"type": "LocalSystem",
                              "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {"qubo": {"type": PASS_TYPE, **parameters}},
        "engine": {"host": "local", "target": "local", "cache_dir": str(tmp_path / "cache"),
                   "output_dir": str(tmp_path / "olive"), "evaluate_input_model": False, "log_severity_level": 3},
    }


def written_models(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.onnx"))


@pytest.mark.slow
@pytest.mark.parametrize("given", ["inline", "file"])
def test_workflow_writes_the_bytes_quantize_and_save_write(tmp_path, given):
    config = QuantizeConfig.from_dict(TWO_BITS)
    expected = api.save(api.quantize(MODEL, config, CALIBRATION), tmp_path / "api.onnx")
    assert expected.report.layers and expected.report.bits == 2
    if given == "file":
        config.save(tmp_path / "config.json")
        parameters: dict = {"quantize_config_path": str(tmp_path / "config.json")}
    else:
        parameters = {"quantize_config": TWO_BITS}
    olive_run(workflow(tmp_path, calibration=str(CALIBRATION), **parameters), package_config=package_config())
    outputs = written_models(tmp_path / "olive")
    assert len(outputs) == 1
    assert outputs[0].read_bytes() == (tmp_path / "api.onnx").read_bytes()


@pytest.mark.slow
def test_pass_with_external_data_returns_the_folder_of_model_and_data(tmp_path):
    with_data = {**TWO_BITS, "output": {"external_data": True}}
    (tmp_path / "api").mkdir()
    api.save(api.quantize(MODEL, QuantizeConfig.from_dict(with_data), CALIBRATION), tmp_path / "api" / MODEL.name)
    qubo = create_pass_from_dict(QuboQuantization, {"quantize_config": with_data, "calibration": str(CALIBRATION)},
                                 disable_search=True)
    handler = qubo.run(ONNXModelHandler(model_path=str(MODEL)), str(tmp_path / "olive"))
    assert handler.get_resource("model_path") == str(tmp_path / "olive") and handler.onnx_file_name == MODEL.name
    for name in (MODEL.name, MODEL.name + ".data"):
        assert (tmp_path / "olive" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()


def test_workflow_refuses_a_bad_option_naming_it(tmp_path):
    with pytest.raises(OptionError, match="weights.bitz"):
        olive_run(workflow(tmp_path, quantize_config={"weights": {"bitz": 2}}, calibration=str(CALIBRATION)),
                  package_config=package_config())
    assert written_models(tmp_path / "olive") == []


def test_package_config_adds_the_pass_to_olives_own():
    with open(OlivePackageConfig.get_default_config_path(), encoding="utf-8") as file:
        olives = json.load(file)["passes"]
    config = OlivePackageConfig.model_validate(package_config())
    assert set(config.passes) == {name.lower() for name in olives} | {PASS_TYPE.lower()}
    assert config.import_pass_module(PASS_TYPE) is QuboQuantization


def test_quantize_config_inline_file_or_defaults_not_both(tmp_path):
    assert quantize_config(TWO_BITS, None) == QuantizeConfig.from_flat(bits=2)
    QuantizeConfig.from_flat(bits=3).save(tmp_path / "three.json")
    assert quantize_config(None, str(tmp_path / "three.json")).weights.bits == 3
    assert quantize_config(None, None) == QuantizeConfig()
    with pytest.raises(OptionError, match="quantize_config or its quantize_config_path, not both"):
        quantize_config(TWO_BITS, str(tmp_path / "three.json"))
