"""A model's inputs as a caller feeds them: name, type and declared shape (graph inputs that are
not initializers). Read by data loading, the LM input rule, evaluation and perplexity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, shape (None for a symbolic dimension) and the
    symbolic dimension names (``dim_param``, None where a dimension has none)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None
    dim_names: tuple[str | None, ...] | None = None


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tensor_type = inp.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape, names = None, None
        if tensor_type.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
            names = tuple(d.dim_param or None for d in tensor_type.shape.dim)
        specs.append(InputSpec(inp.name, dtype, shape, names))
    return specs
