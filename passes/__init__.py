"""Graph passes over ONNX models. Each takes a model and returns a new one (never mutating
its input), and says whether it changed anything; ``run_passes`` applies a visible sequence."""

from .base import GraphPass, PassResult, run_passes
from .check import CheckModel
from .fold_weights import FoldConstantWeights
from .insert_dequantize import ActivationQuantization, InsertDequantize, QuantizedTensor, QuantizedWeight
from .opset import RaiseOpset
from .shapes import ReinferDeclaredShapes
from .subgraph_weights import PrepareSubgraphs

__all__ = ["GraphPass", "PassResult", "run_passes", "CheckModel", "FoldConstantWeights", "InsertDequantize",
           "QuantizedWeight", "QuantizedTensor", "ActivationQuantization", "RaiseOpset", "ReinferDeclaredShapes",
           "PrepareSubgraphs"]
