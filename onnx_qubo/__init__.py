"""onnx-qubo: post-training quantization of ONNX dense layers by QUBO rounding."""

from .api import compare, quantize, sensitivity
from .errors import (
                     DataError,
                     ModelError,
                     OptionError,
                     OutputError,
                     QuboError,
                     QuboInputError,
                     RuntimeFailure,
                     SolverLimitError,
)
from .report import Report

__all__ = ["compare", "quantize", "sensitivity", "DataError", "ModelError", "OptionError", "OutputError", "QuboError",
           "QuboInputError", "Report", "RuntimeFailure", "SolverLimitError"]
__version__ = "0.1.0"
