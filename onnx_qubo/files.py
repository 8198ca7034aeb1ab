"""Reading models and writing outputs without ever leaving a partial file or touching an input.

One place decides what a run may write (``writable_path``): never the input model, its external
data files or the data files being read, and never anything that is not a regular file or a new
path (directories, FIFOs, devices, and symlinks to any of those). Writes go to a short-named
temporary file beside the target, renamed over it (``write_atomically``), so a failure or an
interruption (Ctrl-C, SIGTERM) leaves no partial output. SIGKILL cannot be handled: it can leave
a ``.oq-*.tmp`` file behind, never a partial output.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from . import external
from .errors import ModelError, OutputError
from .external import external_tensors
from .memory import tensor_bytes
from .runtime import PROTOBUF_LIMIT

PathLike = str | os.PathLike
TEMP_PREFIX, TEMP_SUFFIX = ".oq-", ".tmp"  # short: a 255-character output name must still fit
SPECIAL_TREES = ("/dev", "/proc", "/sys")  # paths there are streams or kernel files, never outputs
DATA_SUFFIXES = (".calib.npz", ".eval.npz")  # the data files found beside a model by default


def load_model(path: PathLike) -> onnx.ModelProto:
    """The model at ``path``, after checking that every external data file is a plain file inside
    the model's folder (never absolute, ``..`` or a symlink). External data stays in its files,
    read when a stage needs it (external.py): memory follows the layer at hand, not the model."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"model '{path}' is a directory; give an .onnx file")
    if not path.is_file():
        raise ModelError(f"model file '{path}' does not exist")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise ModelError(f"'{path}' is not a readable ONNX model: {exc}") from None
    if not model.graph.node:
        raise ModelError(f"'{path}' is not an ONNX model (its graph has no nodes)")
    if any(True for _ in external_tensors(model)):
        external_data_files(model, path)  # validates every location first
        external.keep_references(model, path.parent)
    return model


def external_data_files(model: onnx.ModelProto, path: PathLike) -> list[Path]:
    """The external data files of ``model`` (loaded from ``path`` without its external data),
    resolved against the model's folder; a ModelError for a location that is absolute, leaves
    the folder, is a symlink, does not exist or is too short for a tensor's data."""
    folder = Path(path).parent.resolve()
    files: dict[Path, None] = {}
    for tensor in external_tensors(model):
        info = external.data_info(tensor)
        location = info.location
        where = f"'{path}': tensor '{tensor.name}' has its data in '{location}'"
        if not location or Path(location).is_absolute() or Path(location).drive:
            raise ModelError(f"{where}, which is not a path relative to the model's folder")
        candidate = folder / location
        if ".." in Path(location).parts or not candidate.resolve().is_relative_to(folder):
            raise ModelError(f"{where}, outside the model's folder")
        if candidate.is_symlink():
            raise ModelError(f"{where}, a symbolic link; external data must be a plain file")
        if not candidate.is_file():
            raise ModelError(f"{where}, which does not exist or is not a file")
        needed = max(info.offset or 0, 0) + (info.length or tensor_bytes(tensor))
        if needed > candidate.stat().st_size:
            raise ModelError(f"{where} up to byte {needed}, past the end of that file "
                             f"({candidate.stat().st_size} bytes)")
        files[candidate.resolve()] = None
    return list(files)


def inputs_read(model: Any, *data: Any) -> dict[Path, str]:
    """The files a run reads or may read, resolved, each with what it is: the model (when a
    path), its external data files, the ``<stem>.calib.npz`` / ``<stem>.eval.npz`` beside it,
    and the data sources that are paths (other sources, and paths that do not exist, are
    skipped)."""
    reads: dict[Path, str] = {}
    if isinstance(model, (str, os.PathLike)) and Path(model).is_file():
        model = Path(model)
        reads[model.resolve()] = "the input model"
        try:
            for path in external_data_files(onnx.load(model, load_external_data=False), model):
                reads[path] = "external data of the input model"
        except (DecodeError, ValueError, OSError, RuntimeError, ModelError):
            pass  # load_model gives the clear error when the run loads it
        data += tuple(model.with_name(model.stem + suffix) for suffix in DATA_SUFFIXES)
    for path in (Path(d) for d in data if isinstance(d, (str, os.PathLike))):
        if path.exists():
            reads.setdefault(path.resolve(), "a data file")
    return reads


def dump_directory(path: PathLike, *, reads: Collection[Path]) -> Path:
    """``path`` as a directory the QUBO dump may write ``index.json`` and ``*.qubo.npz`` into:
    a new or existing directory holding none of the files this run reads under those names."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"dump_qubo '{path}' exists and is not a directory")
    for read in reads:
        if read.parent == directory.resolve() and (read.name == "index.json" or read.name.endswith(".qubo.npz")):
            raise OutputError(f"dump_qubo '{path}' holds '{read.name}', a file this run reads, which the "
                              "dump would replace; choose another directory")
    return directory


def writable_path(path: PathLike, *, reads: Collection[Path], what: str) -> Path:
    """``path`` as a Path if this run may write ``what`` there, else an OutputError: not a file
    the run reads, not a directory (or a name ending in a separator), not a device, FIFO or
    socket (nor a symlink to one), in an existing, writable folder."""
    try:
        return _check_writable(os.fspath(path), reads, what)
    except OSError as exc:  # e.g. a name too long for the file system
        raise OutputError(f"{what} '{os.fspath(path)}' cannot be written: {exc.strerror or exc}") from None


def _check_writable(text: str, reads: Collection[Path], what: str) -> Path:
    target = Path(text)
    shown = f"{what} '{text}'"
    if text.endswith(("/", os.sep)) or target.is_dir():
        raise OutputError(f"{shown} is a directory; give a file path")
    absolute = Path(os.path.abspath(text))
    if any(absolute.is_relative_to(tree) or target.resolve().is_relative_to(tree) for tree in SPECIAL_TREES):
        raise OutputError(f"{shown} is a device or kernel file, not a regular file")
    resolved = target.resolve()
    for read in reads:
        if resolved == Path(read).resolve() or _same_file(target, Path(read)):
            role = reads[read] if isinstance(reads, Mapping) else "a file"
            raise OutputError(f"{shown} is {role} this run reads; choose another path "
                              "(inputs are never overwritten)")
    if target.is_symlink() or target.exists():
        try:
            mode = os.stat(target).st_mode
        except OSError as exc:
            raise OutputError(f"{shown}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise OutputError(f"{shown} exists and is not a regular file (a device, FIFO or socket)")
    parent = absolute.parent
    if not parent.is_dir():
        raise OutputError(f"{shown}: directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise OutputError(f"{shown} is not writable")
    return target


def _same_file(a: Path, b: Path) -> bool:
    """Whether two existing paths are one file (hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def write_atomically(path: Path, data: bytes, what: str = "output") -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path`` (a
    symlink at ``path`` is replaced, never written through). SIGTERM during the write raises
    KeyboardInterrupt, so the temporary file is removed as for Ctrl-C."""
    folder = Path(os.path.abspath(path)).parent
    with _sigterm_raises():
        try:
            handle, temp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        except OSError as exc:
            raise OutputError(f"{what} '{path}': cannot create a file in '{folder}': {exc.strerror}") from None
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp, 0o666 & ~umask)  # mkstemp's 0600 would surprise; use the usual mode
            os.replace(temp, path)
        except OSError as exc:
            Path(temp).unlink(missing_ok=True)
            raise OutputError(f"{what} '{path}' cannot be written: {exc.strerror or exc}") from None
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def external_data_path(path: Path) -> Path:
    """Where a written model's external data goes: ``<name>.data`` beside it."""
    return path.with_name(path.name + ".data")


def write_model(path: Path, model: onnx.ModelProto, *, external_data: bool, reads: Collection[Path]) -> list[Path]:
    """Write ``model`` to ``path`` atomically, its tensors to ``<name>.data`` beside it when asked
    or when the model would pass protobuf's 2 GB limit; returns the files written. Both files are
    written in a temporary folder beside ``path`` and renamed into place, the data first, so a
    failure leaves neither. With external data the model's tensors are moved out of ``model``:
    write it last. Tensors ``model`` still reads from the input's external data are copied in."""
    external.materialize(model)
    if not external_data and model.ByteSize() < PROTOBUF_LIMIT:
        write_atomically(path, model.SerializeToString())
        return [path]
    data_path = writable_path(external_data_path(path), reads=reads, what="external data")
    folder = Path(os.path.abspath(path)).parent
    with _sigterm_raises():
        try:
            staging = Path(tempfile.mkdtemp(dir=folder, prefix=TEMP_PREFIX))
        except OSError as exc:
            raise OutputError(f"output '{path}': cannot create a folder in '{folder}': {exc.strerror}") from None
        try:
            onnx.save_model(model, staging / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_path.name, size_threshold=0)
            os.replace(staging / data_path.name, data_path)
            os.replace(staging / path.name, path)
        except OSError as exc:
            raise OutputError(f"output '{path}' cannot be written: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [path, data_path]


class _sigterm_raises:
    """While active (main thread only), SIGTERM raises KeyboardInterrupt instead of ending the
    process at once, so ``finally``/``except`` cleanups run."""

    def __enter__(self) -> None:
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGTERM, _raise_interrupt)

    def __exit__(self, *exc: object) -> None:
        if self.installed:  # None: a handler not set from Python; the default is the closest
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
