"""onnx-qubo as an Olive pass (the ``olive`` extra): an Olive workflow quantizes an ONNX model
with the same ``QuantizeConfig`` as the CLI and the API, and gets back Olive's
``ONNXModelHandler`` of the file ``api.save`` writes (the same bytes as ``quantize`` + ``save``).

Olive finds a pass type in its package config (``olive_config.json``: pass name -> module
path), so a workflow names ``"type": "QuboQuantization"`` and passes ``package_config()`` to
``olive.workflows.run`` (or ``olive run --package-config`` a JSON dump of it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.package_config import OlivePackageConfig
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, ParamCategory, PassConfigParam

from . import api
from .config import QuantizeConfig
from .core.errors import OptionError
from .graph.files import external_data_path

PASS_TYPE = "QuboQuantization"


def package_config() -> dict[str, Any]:
    """Olive's own package config with this pass added, for ``olive.workflows.run(...,
    package_config=...)`` (Olive replaces its default with the one given, so it is copied)."""
    with open(OlivePackageConfig.get_default_config_path(), encoding="utf-8") as file:
        config: dict[str, Any] = json.load(file)
    config["passes"][PASS_TYPE] = {"module_path": f"{__name__}.{PASS_TYPE}", "supported_providers": ["*"],
                                   "supported_accelerators": ["*"], "supported_precisions": ["*"]}
    return config


def quantize_config(inline: Mapping[str, Any] | None, path: str | None) -> QuantizeConfig:
    """The run's ``QuantizeConfig``: its saved-file form given inline (``quantize_config``), or
    the file at ``quantize_config_path`` (``QuantizeConfig.save``), or the defaults; not both."""
    if inline is not None and path is not None:
        raise OptionError("give the pass's {quantize_config} or its {quantize_config_path}, not both",
                          "quantize_config", "quantize_config_path")
    if path is not None:
        return QuantizeConfig.load(path)
    return QuantizeConfig() if inline is None else QuantizeConfig.from_dict(inline, "quantize_config")


class QuboQuantization(Pass):
    """Quantize the dense layers' weights by QUBO rounding (onnx_qubo.api.quantize), written by
    onnx_qubo.api.save. Its parameters are not named ``config``: Olive reads a pass entry's
    ``config`` key as the parameters themselves."""

    @classmethod
    def _default_config(cls, accelerator_spec: Any) -> dict[str, PassConfigParam]:
        return {
            "quantize_config": PassConfigParam(
                type_=dict, default_value=None,
                description="The QuantizeConfig in its saved JSON form ({'weights': {'bits': 2}, ...}); "
                            "default: QuantizeConfig()."),
            "quantize_config_path": PassConfigParam(
                type_=str, default_value=None, category=ParamCategory.PATH,
                description="A QuantizeConfig saved as JSON (QuantizeConfig.save, onnx-qubo --save-config), "
                            "instead of quantize_config."),
            "calibration": PassConfigParam(
                type_=str, default_value=None, category=ParamCategory.PATH,
                description="Calibration data: an .npz of arrays keyed by input name; default "
                            "<stem>.calib.npz beside the input model."),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: BasePassConfig,
                        output_model_path: str) -> ONNXModelHandler:
        settings = quantize_config(config.quantize_config, config.quantize_config_path)
        result = api.quantize(model.model_path, settings, config.calibration)
        output = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        api.save(result, output)
        if external_data_path(output).exists():  # Olive's form for a model with its data: the folder
            return ONNXModelHandler(model_path=str(output.parent), onnx_file_name=output.name)
        return ONNXModelHandler(model_path=str(output))
