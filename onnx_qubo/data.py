"""Load calibration/evaluation data and check it against the model's inputs.

Sources: an ``.npz`` path (arrays keyed by input name, optional ``labels``; a single unnamed
array is accepted for a single-input model), a dict of arrays, or an object with onnxruntime's
``CalibrationDataReader`` interface (``get_next()`` returning a feed dict, then None).
The result is a list of feed batches ready for ``InferenceSession.run``. A model whose inputs
have a fixed first axis B (``[1, f]``, as torch.onnx.export writes without dynamic axes) is fed
batches of exactly B samples, whatever ``batch_size`` says.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .errors import DataError

LABELS_KEY = "labels"


@dataclass(frozen=True, eq=False)
class Dataset:
    """Feed batches for a model, plus optional integer class labels (one per sample)."""

    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    origin: str  # where it came from, for messages and reports

    @property
    def num_samples(self) -> int:
        return sum(len(next(iter(batch.values()))) for batch in self.batches)


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and shape (None for a symbolic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tensor_type = inp.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        specs.append(InputSpec(inp.name, dtype, shape))
    return specs


def load_dataset(source: Any, model: onnx.ModelProto, batch_size: int = 256) -> Dataset:
    """Turn any supported source into checked feed batches for ``model``."""
    specs = model_inputs(model)
    if isinstance(source, (str, os.PathLike)):
        arrays, origin = _read_npz(Path(source)), str(source)
    elif isinstance(source, dict):
        arrays, origin = dict(source), "the given arrays"
    elif hasattr(source, "get_next"):
        return _from_reader(source, specs)
    else:
        raise DataError(
            f"calibration data must be an .npz path, a dict of arrays or a CalibrationDataReader, "
            f"not {type(source).__name__}")

    labels = arrays.pop(LABELS_KEY, None)
    if len(specs) == 1 and len(arrays) == 1 and specs[0].name not in arrays:
        arrays = {specs[0].name: next(iter(arrays.values()))}
    feed = _check_feed(arrays, specs, origin)
    count = len(next(iter(feed.values())))
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[:1] != (count,) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{origin}: '{LABELS_KEY}' must hold one integer class per sample "
                f"({count}), got dtype {labels.dtype} shape {labels.shape}")
    step = _fixed_batch(specs, count, origin) or batch_size
    batches = [{name: a[start:start + step] for name, a in feed.items()}
               for start in range(0, count, step)]
    return Dataset(batches, labels, origin)


def _fixed_batch(specs: list[InputSpec], count: int, origin: str) -> int | None:
    """The fixed first-axis size the model's inputs declare (None when any is symbolic);
    a DataError when ``count`` samples do not split into such batches."""
    sizes = {spec.shape[0] if spec.shape else None for spec in specs}
    if len(sizes) != 1 or None in sizes:
        return None
    size = sizes.pop()
    if size and count % size:
        raise DataError(f"{origin}: the model takes batches of exactly {size} samples (its inputs' first "
                        f"axis is fixed), and {count} samples are not a multiple of {size}")
    return size or None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        raise DataError(f"data file '{path}' is a directory; give an .npz file")
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"data file '{path}' is not a readable .npz archive: {exc}") from None
    raise DataError(f"data file '{path}' holds a single array (.npy), not an .npz archive; "
                    "save it with numpy.savez(path, <input name>=array)")


def _from_reader(reader, specs: list[InputSpec]) -> Dataset:
    batches = []
    for i, feed in enumerate(iter(reader.get_next, None)):
        batches.append(_check_feed(dict(feed), specs, f"CalibrationDataReader batch {i}", whole=False))
    if not batches:
        raise DataError("the CalibrationDataReader returned no data")
    return Dataset(batches, None, type(reader).__name__)


def _check_feed(arrays: dict[str, Any], specs: list[InputSpec], origin: str,
                whole: bool = True) -> dict[str, np.ndarray]:
    """Check names, shapes, dtypes and finiteness; cast where no value can change. ``whole``:
    the arrays hold all samples (their first axis is split into batches later, so it need not
    match a fixed batch size), else they are one batch as fed."""
    expected = {spec.name for spec in specs}
    missing, extra = expected - arrays.keys(), arrays.keys() - expected
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {sorted(missing)}")
        if extra:
            parts.append(f"unexpected {sorted(extra)}")
        raise DataError(
            f"{origin}: keys do not match the model inputs {sorted(expected)}: {', '.join(parts)}")

    feed = {}
    counts = set()
    for spec in specs:
        array = np.asarray(arrays[spec.name])
        where = f"{origin}: input '{spec.name}'"
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise DataError(f"{where} has shape {array.shape}; the model expects rank "
                                     f"{len(spec.shape)} {_show_shape(spec.shape)}")
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if want is not None and got != want and not (axis == 0 and whole):
                    raise DataError(f"{where} has shape {array.shape}; the model expects "
                                         f"{_show_shape(spec.shape)} (axis {axis} differs)")
        feed[spec.name] = _cast(array, spec.dtype, where)
        counts.add(array.shape[0] if array.ndim else None)
    if len(counts) != 1 or None in counts or 0 in counts:
        raise DataError(f"{origin}: inputs must share a non-empty first (batch) axis, "
                        f"got sizes {sorted(map(str, counts))}")
    return feed


def _cast(array: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{where} contains NaN or Inf")
    if array.dtype == dtype:
        return array
    same_family = array.dtype.kind in "fiub" and dtype.kind in "fiub"
    if not same_family or not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise DataError(f"{where} has dtype {array.dtype}; the model expects {dtype}")
    cast = array.astype(dtype)
    if dtype.kind in "iu" and not np.array_equal(cast, array):
        raise DataError(f"{where} has values that do not fit the model's dtype {dtype}")
    return cast


def _show_shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
