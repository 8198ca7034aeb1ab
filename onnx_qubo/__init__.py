"""onnx-qubo: post-training quantization of ONNX dense layers by QUBO rounding."""

from .api import Result, compare, evaluate, measure_speed, quantize, run, save, sensitivity
from .config import PerBlock, PerChannel, PerTensor, QuantizeConfig
from .core.errors import (
                     DataError,
                     ModelError,
                     OptionError,
                     OutputError,
                     QuboError,
                     QuboInputError,
                     RuntimeFailure,
                     SolverLimitError,
)
from .core.report import Report

__all__ = ["compare", "evaluate", "measure_speed", "quantize", "run", "save", "sensitivity", "QuantizeConfig", "Result",
           "PerBlock", "PerChannel", "PerTensor", "DataError", "ModelError", "OptionError", "OutputError", "QuboError",
           "QuboInputError", "Report", "RuntimeFailure", "SolverLimitError"]
__version__ = "0.1.0"
