"""onnx-qubo: post-training quantization of ONNX dense layers by QUBO rounding."""

from .api import quantize
from .errors import QuboInputError
from .report import Report

__all__ = ["quantize", "QuboInputError", "Report"]
__version__ = "0.1.0"
