"""A whole run in one call for tests, the options as flat keywords (``QuantizeConfig.from_flat``)."""

from onnx_qubo import api
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.report import Report


def quantize(model, output_path, *, calibration=None, evaluation=None, report_path=None, speed=True,
             progress=False, **options) -> Report:
    """The report of ``api.run`` on ``model`` with ``options`` (flat names), written to ``output_path``."""
    return api.run(model, output_path, QuantizeConfig.from_flat(options), calibration=calibration,
                   evaluation=evaluation, report_path=report_path, speed=speed, progress=progress).report
