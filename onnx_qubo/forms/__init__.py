"""The dense forms onnx-qubo finds and rewrites, one object per graph pattern.

To add a form: a module here with a class holding ``op_type``, ``match`` (node -> DenseLayer
or Skip with its reason) and ``lower`` (node + integers -> nodes), and one entry in ``FORMS``.
"""

from .base import GraphIndex, Skip
from .gemm import GemmForm
from .matmul import MatMulForm

FORMS = {form.op_type: form for form in (GemmForm(), MatMulForm())}  # op type -> its form

__all__ = ["FORMS", "GemmForm", "GraphIndex", "MatMulForm", "Skip"]
