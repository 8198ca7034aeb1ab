"""A whole run in one call for tests: the library API's steps as the CLI composes them (check the
outputs, quantize, evaluate, time, save), the options as flat keywords (``QuantizeConfig.from_flat``)."""

from onnx_qubo import api
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.report import Report


def quantize(model, output_path, *, calibration=None, evaluation=None, report_path=None, speed=True,
             progress=False, **options) -> Report:
    """The report of quantizing ``model`` to ``output_path`` with ``options`` (flat names)."""
    config = QuantizeConfig.from_flat(options)
    target = api.destination(model, output_path, config, calibration=calibration, evaluation=evaluation,
                             report_path=report_path)
    result = api.quantize(model, config, calibration, progress=progress)
    result = api.evaluate(result, evaluation, progress=progress)
    if speed:
        result = api.measure_speed(result, evaluation)
    return api.save(result, target).report
