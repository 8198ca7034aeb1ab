"""onnx-qubo: post-training quantization of ONNX dense layers by QUBO rounding."""

from .api import compare, quantize
from .errors import QuboInputError
from .report import Report

__all__ = ["compare", "quantize", "QuboInputError", "Report"]
__version__ = "0.1.0"
