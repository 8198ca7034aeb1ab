"""Load calibration/evaluation data and check it against the model's inputs.

Sources: an ``.npz`` path (arrays keyed by input name, optional ``labels``; a single unnamed
array is accepted for a single-input model), a dict of arrays, or an object with onnxruntime's
``CalibrationDataReader`` interface (``get_next()`` returning a feed dict, then None).
The result is a list of feed batches ready for ``InferenceSession.run``. A model whose inputs
have a fixed first axis B (``[1, f]``, as torch.onnx.export writes without dynamic axes) is fed
batches of exactly B samples, whatever ``batch_size`` says.

Inputs that are not a batch of samples along axis 0 (``batch_axes``, read off the model's
declared shapes): a scalar, or an input whose fixed-size shape has no batch axis while other
inputs have a symbolic one, is fed whole to every batch (a sample rate, a configuration
vector); an input whose first axis is fixed but another axis carries the symbolic name of the
other inputs' first axis is a batch along that axis (a recurrent state ``[2, batch, 128]``
beside ``input [batch, 512]``) and is sliced there; with unnamed symbolic axes (``[2, ?, 128]``)
the data decides, when its one symbolic axis holds as many slices as there are samples. What
neither settles is a DataError.

A causal LM's inputs beside its token ids (``attention_mask``, ``position_ids``, an empty KV
cache) are made when the data holds ``input_ids`` alone: the rule is ``lm_inputs.py``'s.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..core.errors import DataError
from ..graph.signature import InputSpec, model_inputs
from .lm_inputs import LmInputs

LABELS_KEY = "labels"


@dataclass(frozen=True, eq=False)
class Dataset:
    """Feed batches for a model, plus optional integer class labels (one per sample).
    ``axes``: each input's batch axis (None: fed whole to every batch; absent: axis 0)."""

    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    origin: str  # where it came from, for messages and reports
    axes: dict[str, int | None] = field(default_factory=dict)
    splittable: bool = True  # a batch may be run in pieces (False: a fixed batch size, or a reader's batches)
    padding_mask: str | None = None  # the input whose zeros mark padded positions (padding.py), if any

    def samples(self, batch: dict[str, np.ndarray]) -> int:
        """How many samples ``batch`` holds (read off its first input that has a batch axis)."""
        for name, array in batch.items():
            axis = self.axes.get(name, 0)
            if axis is not None:
                return array.shape[axis]
        raise ValueError("no input of the batch has a batch axis")  # load_dataset refuses such data

    def head(self, batch: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
        """The first ``count`` samples of ``batch``; inputs fed whole stay whole."""
        return self.piece(batch, 0, count)

    def piece(self, batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples ``start:stop`` of ``batch``; inputs fed whole stay whole."""
        return {name: _take(array, self.axes.get(name, 0), start, stop) for name, array in batch.items()}

    @property
    def num_samples(self) -> int:
        return sum(self.samples(batch) for batch in self.batches)


def batch_axes(specs: list[InputSpec], arrays: dict[str, np.ndarray] | None = None) -> dict[str, int | None]:
    """Each input's batch axis, None for an input fed whole to every batch (module docstring).

    Axis 0, except: a scalar input (declared rank 0, or no declared shape and a 0-d array in
    ``arrays``) has none. An input with a fixed first axis beside inputs whose first axis is
    symbolic has its batch on the one other axis named like their first axis; failing a name, on
    its one unnamed symbolic axis when that axis holds as many samples in ``arrays`` as the
    inputs batched on axis 0 (else a DataError: the model cannot tell); with neither, it is fed
    whole. When every input's first axis is fixed, the model takes batches of that size."""
    arrays = arrays or {}
    firsts = {spec.dim_names[0] for spec in specs if spec.dim_names and spec.dim_names[0]}
    symbolic = any(spec.shape is None or (spec.shape and spec.shape[0] is None) for spec in specs)
    count = next((np.shape(arrays[spec.name])[0] for spec in specs if spec.name in arrays and np.ndim(arrays[spec.name])
                  and (spec.shape is None or (spec.shape and spec.shape[0] is None))), None)
    axes: dict[str, int | None] = {}
    for spec in specs:
        if spec.shape is None:
            axes[spec.name] = None if spec.name in arrays and np.ndim(arrays[spec.name]) == 0 else 0
            continue
        if not spec.shape or spec.shape[0] is None or not symbolic:
            axes[spec.name] = 0 if spec.shape else None
            continue
        names = spec.dim_names or (None,) * len(spec.shape)
        named = [k for k, name in enumerate(names) if k and name in firsts]
        unnamed = [k for k, (size, name) in enumerate(zip(spec.shape, names)) if k and size is None and not name]
        shown = _show_shape(spec.shape, spec.dim_names)
        if len(named) > 1:
            raise DataError(f"input '{spec.name}' {shown}: several axes carry the batch dimension's name, so "
                            "which one holds the samples is ambiguous")
        if named:
            axes[spec.name] = named[0]
        elif not unnamed:
            axes[spec.name] = None
        elif len(unnamed) == 1 and spec.name in arrays and count is not None \
                and np.ndim(arrays[spec.name]) > unnamed[0] and np.shape(arrays[spec.name])[unnamed[0]] == count:
            axes[spec.name] = unnamed[0]
        else:
            raise DataError(f"input '{spec.name}' {shown}: its first axis is fixed and its symbolic axes are unnamed, "
                            "so the model does not say whether it holds one slice per sample; give it with as many "
                            f"slices as samples ({count}) on its one symbolic axis, or name that axis like the other "
                            "inputs' batch axis (dim_param)")
    if all(axis is None for axis in axes.values()):
        raise DataError("no model input has a batch axis (all are scalars or fixed-size tensors fed whole), so the "
                        "data cannot be split into samples")
    return axes


def load_dataset(source: Any, model: onnx.ModelProto, batch_size: int = 256) -> Dataset:
    """Turn any supported source into checked feed batches for ``model``."""
    specs = model_inputs(model)
    if isinstance(source, (str, os.PathLike)):
        arrays, origin = _read_npz(Path(source)), str(source)
    elif isinstance(source, dict):
        arrays, origin = dict(source), "the given arrays"
    elif hasattr(source, "get_next"):
        return _from_reader(source, specs, model)
    else:
        raise DataError(
            f"calibration data must be an .npz path, a dict of arrays or a CalibrationDataReader, "
            f"not {type(source).__name__}")

    labels = arrays.pop(LABELS_KEY, None)
    if len(specs) == 1 and len(arrays) == 1 and specs[0].name not in arrays:
        arrays = {specs[0].name: next(iter(arrays.values()))}
    arrays = LmInputs(model).derive(arrays, origin)
    axes = batch_axes(specs, arrays)
    feed, count = _check_feed(arrays, specs, axes, origin)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{origin}: '{LABELS_KEY}' must hold one integer class per sample, a 1-D array of "
                f"{count}, got dtype {labels.dtype} shape {labels.shape}")
    fixed = _fixed_batch(specs, axes, count, origin)
    step = fixed or batch_size
    if fixed and count % fixed:  # whole batches only, and say so
        used = count - count % fixed
        origin = f"{origin} (its first {used} of {count} samples: the model takes batches of exactly {fixed})"
        count, labels = used, None if labels is None else labels[:used]
    batches = [{name: _take(a, axes[name], start, start + step) for name, a in feed.items()}
               for start in range(0, count, step)]
    return Dataset(batches, labels, origin, axes, splittable=fixed is None)


def _take(array: np.ndarray, axis: int | None, start: int, stop: int) -> np.ndarray:
    """Samples ``start:stop`` of ``array`` along its batch ``axis`` (all of it when None)."""
    if axis is None:
        return array
    return array[(slice(None),) * axis + (slice(start, stop),)]


def _fixed_batch(specs: list[InputSpec], axes: dict[str, int | None], count: int, origin: str) -> int | None:
    """The fixed batch size the model's inputs declare on their batch axes (None when any is
    symbolic); a DataError when ``count`` samples do not fill one such batch (a remainder past whole
    batches is left out by the caller, which says so)."""
    sizes = {spec.shape[axis] if spec.shape else None for spec in specs if (axis := axes[spec.name]) is not None}
    if len(sizes) != 1 or None in sizes:
        return None
    size = sizes.pop()
    if size and count < size:
        raise DataError(f"{origin}: the model takes batches of exactly {size} samples (its inputs' first "
                        f"axis is fixed), and there are only {count}")
    return size or None


DEFLATE_RATIO = 1032  # the most a deflate stream can expand (zlib's bound), with a header's margin below


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive by key; a DataError naming the file (and key) for anything
    else: a directory, a .npy, a corrupt or unsupported archive, an object array, or an array whose
    header declares more bytes than its entry holds (checked before anything is allocated, so a
    1 KB file declaring terabytes is refused, not attempted)."""
    if path.is_dir():
        raise DataError(f"data file '{path}' is a directory; give an .npz file")
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    try:
        with open(path, "rb") as stream:
            single = stream.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX
        if single:
            raise DataError(f"data file '{path}' holds a single array (.npy), not an .npz archive; "
                            "save it with numpy.savez(path, <input name>=array)")
        with zipfile.ZipFile(path) as archive:
            return {info.filename[:-len(".npy")]: _read_entry(archive, info, path) for info in archive.infolist()
                    if not info.is_dir()}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, zlib.error) as exc:
        raise DataError(f"data file '{path}' is not a readable .npz archive: {exc}") from None


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    """One array of an .npz archive, its declared size checked against what the entry holds."""
    key = info.filename[:-len(".npy")] if info.filename.endswith(".npy") else info.filename
    where = f"data file '{path}', array '{key}'"
    if not info.filename.endswith(".npy"):
        raise DataError(f"{where}: the archive entry '{info.filename}' is not an array (.npy)")
    declared = 0
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(member)
            payload = info.file_size - member.tell()
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        bound = {zipfile.ZIP_STORED: info.compress_size, zipfile.ZIP_DEFLATED: DEFLATE_RATIO * info.compress_size}
        if dtype.hasobject:
            raise DataError(f"{where} holds Python objects ({dtype}); give numeric arrays")
        if declared != payload or declared > bound.get(info.compress_type, declared):
            raise DataError(f"{where} declares shape {shape} of {dtype} ({declared:,} bytes), but its entry "
                            f"holds {max(payload, 0):,} bytes ({info.compress_size:,} compressed): the file is "
                            "truncated or corrupt")
        with archive.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    except DataError:
        raise
    except NotImplementedError as exc:  # zipfile: a compression method it cannot read
        raise DataError(f"{where} cannot be read: {exc} (numpy.savez and savez_compressed write archives "
                        "that can)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{where} cannot be read: {exc}") from None
    except MemoryError:
        raise DataError(f"{where} ({declared:,} bytes) does not fit in memory") from None


def _from_reader(reader, specs: list[InputSpec], model: onnx.ModelProto) -> Dataset:
    batches: list[dict[str, np.ndarray]] = []
    axes: dict[str, int | None] = {}
    lm_inputs = LmInputs(model)
    for i, feed in enumerate(iter(reader.get_next, None)):
        feed = lm_inputs.derive(dict(feed), f"CalibrationDataReader batch {i}")
        axes = axes or batch_axes(specs, feed)
        batches.append(_check_feed(feed, specs, axes, f"CalibrationDataReader batch {i}", whole=False)[0])
    if not batches:
        raise DataError("the CalibrationDataReader returned no data")
    return Dataset(batches, None, type(reader).__name__, axes, splittable=False)


def _check_feed(arrays: dict[str, Any], specs: list[InputSpec], axes: dict[str, int | None], origin: str,
                whole: bool = True) -> tuple[dict[str, np.ndarray], int]:
    """Check names, shapes, dtypes and finiteness; cast where no value can change; return the
    feed and its number of samples. ``whole``: the arrays hold all samples (split along their
    batch axes later, so those need not match a fixed batch size), else one batch as fed."""
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
    counts: dict[str, int] = {}
    for spec in specs:
        array = np.asarray(arrays[spec.name])
        where = f"{origin}: input '{spec.name}'"
        batch = axes.get(spec.name, 0)
        fed_whole = " (it has no batch axis: it is fed whole to every batch)" if batch is None else ""
        if spec.shape is not None:
            shown = _show_shape(spec.shape, spec.dim_names)
            if array.ndim != len(spec.shape):
                raise DataError(f"{where} has shape {array.shape}; the model expects rank "
                                f"{len(spec.shape)} {shown}{fed_whole}")
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if want is not None and got != want and not (axis == batch and whole):
                    raise DataError(f"{where} has shape {array.shape}; the model expects "
                                    f"{shown} (axis {axis} differs){fed_whole}")
        feed[spec.name] = _cast(array, spec.dtype, where)
        if batch is not None:
            if array.ndim <= batch:
                raise DataError(f"{where} has shape {array.shape}: it has no axis {batch} to hold the samples")
            counts[spec.name] = array.shape[batch]
    if len(set(counts.values())) != 1 or 0 in counts.values():
        sizes = ", ".join(f"'{name}' {count} (axis {axes.get(name, 0)})" for name, count in counts.items())
        raise DataError(f"{origin}: inputs must hold the same non-empty number of samples along their batch "
                        f"axes, got {sizes}")
    return feed, next(iter(counts.values()))


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
    if dtype.kind == "f" and dtype.itemsize < 4 and not np.array_equal(cast, array):
        # float64 -> float32 (numpy's default float into a float32 model) is cast; a half-precision model
        # would see its data rounded to 11 bits, or overflowed past 65504: the user decides that
        raise DataError(f"{where} has dtype {array.dtype} values that {dtype} cannot hold exactly (the model "
                        f"takes {dtype}); convert the data to {dtype} yourself if that rounding is intended")
    return cast


def _show_shape(shape: tuple[int | None, ...], names: tuple[str | None, ...] | None = None) -> str:
    names = names or (None,) * len(shape)
    return "[" + ", ".join(name or ("?" if d is None else str(d)) for d, name in zip(shape, names)) + "]"
