"""Models whose weights stay in their external data files until a stage needs them.

A model loaded from a path with external data (``files.load_model``) keeps its tensors as
references: its protobuf then holds only the graph, so a model of any size (one over protobuf's
2 GB limit included) can be copied, inferred, checked and handed to onnxruntime, and its weights
are read one layer at a time. The folder the references are relative to travels with the model
as a metadata entry (copies of the model keep it), which this module alone reads and writes:

- ``read_array``: one tensor's values, from the proto or its file;
- ``data_info``: a tensor's external data entry, checked (files.py, before anything is read);
- ``session_folder``: what onnxruntime needs to resolve the references (runtime.py);
- ``materialize``: every reference replaced by its values, the entry removed (before a write);
- ``spill``: the other way, a model's weights moved into a data file of a folder of its own (a
  model this library made, such as the rotated one, then costs its sessions no copy of them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor, uses_external_data

from .errors import ModelError

FOLDER_KEY = "onnx_qubo.external_data_folder"
SPILL_FILE = "weights.data"  # spill's data file in its folder
SPILL_ALIGN = 4096  # spilled tensors start on page boundaries, as onnx's own external data writer can
SPILL_LEAST = 1024  # main-graph initializers of fewer bytes stay in the proto
SUB_BYTE_TYPES: dict[int, int] = {  # values packed per byte in a tensor's raw data
    onnx.TensorProto.INT4: 2, onnx.TensorProto.UINT4: 2, onnx.TensorProto.INT2: 4, onnx.TensorProto.UINT2: 4}


def keep_references(model: onnx.ModelProto, folder: Path) -> None:
    """Record that ``model``'s external data references are relative to ``folder``."""
    _remove_key(model)
    model.metadata_props.add(key=FOLDER_KEY, value=str(folder.resolve()))


def session_folder(model: onnx.ModelProto) -> Path | None:
    """The folder ``model``'s external references are relative to (None: all data in the proto)."""
    for prop in model.metadata_props:
        if prop.key == FOLDER_KEY:
            return Path(prop.value)
    return None


def read_array(tensor: onnx.TensorProto, model: onnx.ModelProto) -> np.ndarray:
    """The values of ``tensor``, an initializer of ``model``, wherever they are stored; a
    ModelError naming it when they do not fill its dims or onnx refuses to read its data file
    (one outside the model's folder, or with several hard links)."""
    folder = session_folder(model)
    if uses_external_data(tensor) and folder is None:
        raise ModelError(f"tensor '{tensor.name}' refers to external data that was not loaded: give the model's path, "
                         "or load it with onnx.load(path) (external data included)")
    try:
        return numpy_helper.to_array(tensor, base_dir=str(folder or ""))
    except ValueError as exc:  # numpy: cannot reshape the values to the dims
        raise ModelError(f"tensor '{tensor.name}' holds values that do not fit its dims {list(tensor.dims)}: "
                         f"{exc}") from None
    except onnx.checker.ValidationError as exc:  # onnx's guards on external data paths and files
        advice = (": give the model a data file of its own (a copy, not a hard link)"
                  if "hard link" in str(exc) else "")
        reason = str(exc).rstrip(".")
        raise ModelError(f"the external data of tensor '{tensor.name}' cannot be read: {reason}{advice}") from None


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The size of a tensor's values, wherever they are stored."""
    count = int(np.prod(tensor.dims, dtype=np.int64))
    per_byte = SUB_BYTE_TYPES.get(tensor.data_type)
    if per_byte:
        return -(-count // per_byte)
    try:
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return count * 4


def data_info(tensor: onnx.TensorProto) -> ExternalDataInfo:
    """``tensor``'s external data entry, checked: offset and length non-negative integers, and
    the length, when given, the bytes its dims and type take; a ModelError naming it otherwise."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    for key in ("offset", "length"):
        if key in entries and not entries[key].isdecimal():  # digits only: no sign, no fraction
            raise ModelError(f"tensor '{tensor.name}': its external data {key} '{entries[key]}' is not a "
                             "non-negative integer")
    info = ExternalDataInfo(tensor)
    needed = tensor_bytes(tensor)
    if "length" in entries and info.length != needed:
        raise ModelError(f"tensor '{tensor.name}': its external data length is {info.length} bytes, but its dims "
                         f"{list(tensor.dims)} take {needed}")
    return info


def loaded(tensor: onnx.TensorProto, model: onnx.ModelProto) -> onnx.TensorProto:
    """``tensor`` with its values in the proto (itself when they already are)."""
    if not uses_external_data(tensor):
        return tensor
    return numpy_helper.from_array(read_array(tensor, model), tensor.name)


def materialize(model: onnx.ModelProto) -> None:
    """Load every external tensor of ``model`` into it and drop the folder entry: the model is then
    self-contained, as writing it elsewhere needs, and each tensor the bytes it would have had in
    the proto (no data_location field: the same file from a model in memory or in files)."""
    folder = session_folder(model)
    if folder is None:
        return
    for tensor in external_tensors(model):
        load_external_data_for_tensor(tensor, str(folder))
        tensor.ClearField("data_location")
    _remove_key(model)


def spill(model: onnx.ModelProto, folder: Path) -> None:
    """Move ``model``'s external tensors and its main graph's initializers of ``SPILL_LEAST`` bytes
    or more (those in raw bytes) into ``folder``/``SPILL_FILE``, one at a time, leaving references
    to it: the proto keeps the graph, and onnxruntime maps the weights from the file instead of
    copying a serialized proto (runtime.py). ``folder`` must outlive every use of the references."""
    source = session_folder(model)
    moved = list(external_tensors(model)) + [
        tensor for tensor in model.graph.initializer
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= SPILL_LEAST]
    with (folder / SPILL_FILE).open("xb") as file:
        for tensor in moved:
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(source))
            offset = -(-file.tell() // SPILL_ALIGN) * SPILL_ALIGN
            file.seek(offset)
            file.write(tensor.raw_data)
            length = len(tensor.raw_data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", SPILL_FILE), ("offset", offset), ("length", length)):
                tensor.external_data.add(key=key, value=str(value))
            tensor.data_location = onnx.TensorProto.EXTERNAL
    keep_references(model, folder)


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model stored as external data: initializers and tensor attributes,
    in the main graph, its subgraphs and the model's local functions."""
    def of_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        yield from (sparse.values for sparse in graph.sparse_initializer)
        yield from of_nodes(graph.node)

    def of_nodes(nodes: object) -> Iterator[onnx.TensorProto]:
        for node in nodes:  # type: ignore[attr-defined]
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from of_graph(attr.g)
                for sub in attr.graphs:
                    yield from of_graph(sub)

    tensors = list(of_graph(model.graph))
    for function in model.functions:
        tensors += of_nodes(function.node)
    yield from (t for t in tensors if uses_external_data(t))


def _remove_key(model: onnx.ModelProto) -> None:
    kept = [prop for prop in model.metadata_props if prop.key != FOLDER_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
