"""The inputs a causal language model takes beside its token ids, made when the data holds
``input_ids`` alone (token windows, as onnxruntime-genai's builder and most LM exports expect).

One rule, applied by ``data.load_dataset`` to the inputs the data lacks, and only when the data
holds ``input_ids`` of shape ``[N, T]`` (N windows of T tokens):

- ``attention_mask`` (an integer input): ones ``[N, T]``, every token attended (no padding, and
  with an empty past the total length is T);
- ``position_ids`` (an integer input): ``0 .. T-1`` in every row;
- a past key/value input (a KV cache: a float input with a symbolic axis whose name starts with
  ``past``, e.g. ``past_key_values.0.key [batch_size, 3, past_sequence_length, kv_cache_dim]``): an
  empty past, length 0 on that axis, N on the axis named like ``input_ids``' first axis, the
  declared size on fixed axes; another symbolic axis takes its size from the node that reads the
  input: the head size of an attention node (``com.microsoft`` ``GroupQueryAttention`` or
  ``MultiHeadAttention``: the query's width over its heads, a packed query-key-value over all of
  them), or, for a ``Concat`` appending the new keys or values to the past (as the builder's fp16
  graphs and exported caches do), the other operand's size on that axis.

Any other missing input stays missing (the data check names it); a past input whose other axes
cannot be told this way is a DataError naming the input and the axis.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..core.errors import DataError
from ..graph.signature import model_inputs

TOKENS = "input_ids"
MASK = "attention_mask"
POSITIONS = "position_ids"
PAST_PREFIX = "past"  # a KV cache input's symbolic past-length axis is named past_...
MS_DOMAIN = "com.microsoft"


class LmInputs:
    """The rule above for one model (the head sizes are read off its graph once, when first needed)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.specs = {spec.name: spec for spec in model_inputs(model)}
        self.sizes: dict[str, dict[int, int]] | None = None

    def derive(self, arrays: dict[str, Any], origin: str) -> dict[str, Any]:
        """``arrays`` with the inputs the rule makes added (a new dict; ``arrays`` as it is when it
        holds no ``input_ids`` of rank 2)."""
        tokens = arrays.get(TOKENS)
        if TOKENS not in self.specs or tokens is None or np.ndim(tokens) != 2:
            return arrays
        count, length = np.shape(tokens)
        batch_name = (self.specs[TOKENS].dim_names or (None,))[0]
        made = dict(arrays)
        for name, spec in self.specs.items():
            if name in arrays:
                continue
            if spec.shape is None:
                if spec.dtype.kind == "f" and name in self.past_sizes():
                    raise DataError(f"{origin}: input '{name}' is a KV cache (an attention node reads it as its past) "
                                    "but the model declares no shape for it, so no empty past can be made from "
                                    f"'{TOKENS}'; declare its shape in the model or give it in the data")
                continue
            names = spec.dim_names or (None,) * len(spec.shape)
            if name == MASK and spec.dtype.kind in "iu" and len(spec.shape) == 2:
                made[name] = np.ones((count, length), spec.dtype)
            elif name == POSITIONS and spec.dtype.kind in "iu" and len(spec.shape) == 2:
                made[name] = np.broadcast_to(np.arange(length, dtype=spec.dtype), (count, length)).copy()
            elif spec.dtype.kind == "f" and any(d and d.startswith(PAST_PREFIX) for d in names):
                shape = _empty_past_shape(name, spec.shape, names, batch_name, count, self.past_sizes(), origin)
                made[name] = np.zeros(shape, spec.dtype)
        return made

    def past_sizes(self) -> dict[str, dict[int, int]]:
        """Past input name -> {axis: size} its readers tell (see the module's docstring)."""
        if self.sizes is None:
            self.sizes = _past_sizes(self.model)
        return self.sizes


def _empty_past_shape(name: str, shape: tuple[int | None, ...], names: tuple[str | None, ...],
                      batch_name: str | None, count: int, sizes: dict[str, dict[int, int]],
                      origin: str) -> tuple[int, ...]:
    told = sizes.get(name, {})
    dims = []
    for axis, (size, dim) in enumerate(zip(shape, names)):
        if size is not None:
            dims.append(size)
        elif dim and dim.startswith(PAST_PREFIX):
            dims.append(0)
        elif (dim is not None and dim == batch_name) or (axis == 0 and batch_name is None):
            dims.append(count)
        elif axis in told:
            dims.append(told[axis])
        else:
            raise DataError(f"{origin}: input '{name}' (a KV cache, made as an empty past since the data holds only "
                            f"'{TOKENS}'): the size of its axis {axis} ('{dim or '?'}') cannot be told from the model "
                            "(neither an attention node nor a Concat with a known shape reads it); give it in the data")
    return tuple(dims)


def _past_sizes(model: onnx.ModelProto) -> dict[str, dict[int, int]]:
    """Past input name -> {axis: size}, from the attention contrib nodes and Concats that read it."""
    from ..graph.subgraphs import skeleton  # inference on the graph alone
    from ..passes.shapes import tensor_types

    types = tensor_types(skeleton(model))

    def dims(tensor: str) -> list[int | None]:
        kind = types.get(tensor)
        shape = kind.tensor_type.shape.dim if kind is not None and kind.tensor_type.HasField("shape") else []
        return [d.dim_value if d.HasField("dim_value") else None for d in shape]

    ranks = {spec.name: None if spec.shape is None else len(spec.shape) for spec in model_inputs(model)}
    sizes: dict[str, dict[int, int]] = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain == "" and node.op_type == "Concat" and len(node.input) == 2:
            for past, other in (node.input, node.input[::-1]):
                shape = dims(other)
                if past in ranks and other not in ranks and len(shape) == ranks[past]:
                    axis = int(attrs["axis"]) % len(shape)
                    told = {a: size for a, size in enumerate(shape) if a != axis and size}
                    sizes.setdefault(past, {}).update(told)
            continue
        if node.domain != MS_DOMAIN or node.op_type not in ("GroupQueryAttention", "MultiHeadAttention"):
            continue
        inputs = list(node.input) + [""] * 8
        query = (dims(inputs[0]) or [None])[-1]
        heads = int(attrs.get("num_heads", 0))
        if node.op_type == "GroupQueryAttention":
            past = inputs[3:5]
            if not inputs[1]:  # query, key and value packed in one input
                heads += 2 * int(attrs.get("kv_num_heads", 0))
        else:
            past = inputs[6:8]
        if query and heads and query % heads == 0:
            for name in past:
                rank = ranks.get(name)
                told = sizes.setdefault(name, {}) if name in ranks else {}
                if rank is not None:  # [batch, kv heads, past length, head size]
                    told[rank - 1] = query // heads
    return sizes
