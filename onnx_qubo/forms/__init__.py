"""The dense forms onnx-qubo finds and rewrites, one object per graph pattern.

To add a form: a module here with a class holding ``op_type``, ``match`` (node -> DenseLayer
or Skip with its reason) and ``lower`` (node + integers -> nodes), and one entry in ``FORMS``.
"""

from .base import DenseForm, GraphIndex, Skip
from .conv import ConvForm
from .gemm import GemmForm
from .matmul import MatMulForm
from .recurrent import RecurrentForm

_FORMS: list[DenseForm] = [GemmForm(), MatMulForm(), ConvForm(), *(RecurrentForm(op) for op in ("LSTM", "GRU", "RNN"))]
FORMS: dict[str, DenseForm] = {form.op_type: form for form in _FORMS}

__all__ = ["FORMS", "ConvForm", "GemmForm", "GraphIndex", "MatMulForm", "RecurrentForm", "Skip"]
