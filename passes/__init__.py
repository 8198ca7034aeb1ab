"""Graph passes over ONNX models. Each takes a model and returns a new one (never mutating
its input), and says whether it changed anything; ``run_passes`` applies a visible sequence.

A layer of its own: the passes import onnx, numpy and each other, never onnx_qubo. What they
need of their caller comes in as arguments: how a form lowers its node (``DenseLowering``), a
runtime kernel (``KernelLayer``), how to read a tensor in external data (``TensorReader``). They
raise their own errors (``PassError``), which the caller maps to its own."""

from .base import GraphPass, PassResult, run_passes
from .check import CheckModel
from .errors import PassError, PassFailed, UnsupportedModel
from .fold_weights import FoldConstantWeights
from .graphs import TensorReader, read_in_proto
from .insert_dequantize import (
    ActivationQuantization,
    DenseLowering,
    GraphEdit,
    InsertDequantize,
    KernelLayer,
    Lowered,
    QuantizedTensor,
    QuantizedWeight,
)
from .opset import RaiseOpset
from .rotate import RotateInputs, online_rotations
from .shapes import ReinferDeclaredShapes
from .subgraph_weights import PrepareSubgraphs

__all__ = ["GraphPass", "PassResult", "run_passes", "PassError", "PassFailed", "UnsupportedModel", "CheckModel",
           "FoldConstantWeights", "InsertDequantize", "QuantizedWeight", "QuantizedTensor", "ActivationQuantization",
           "DenseLowering", "KernelLayer", "Lowered", "GraphEdit", "TensorReader", "read_in_proto", "RaiseOpset",
           "ReinferDeclaredShapes", "PrepareSubgraphs", "RotateInputs", "online_rotations"]
