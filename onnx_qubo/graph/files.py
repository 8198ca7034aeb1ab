"""Reading models and writing outputs without ever leaving a partial file or touching an input.

One place knows every file a run reads (``inputs_read``: the model, its external data files, the
data files, a ``load_solution`` folder's files) and decides what the run may write
(``writable_path``): never one of those, and never anything that is not a regular file or a new
path (directories, FIFOs, devices, and symlinks to any of those). A model read from an
onnxruntime-genai folder gets its configuration and tokenizer files beside the output
(``genai_folder``). Outputs are written as one
unit (``Outputs``): each file is staged in a temporary folder beside its target, then all are
renamed into place with SIGINT/SIGTERM deferred, the external data before the model that reads
it and the report last; a failure or an interruption at any step leaves every target as it was
(a replaced file is kept as a hard link until the unit is in place) and no temporary file.
Written files get the mode a newly created file gets under the umask. SIGKILL cannot be handled:
it can leave a ``.oq-*`` folder behind, never a partial output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import set_external_data

from ..core import external
from ..core.errors import Interrupted, ModelError, OutputError
from ..core.external import external_tensors, tensor_bytes
from .runtime import PROTOBUF_LIMIT

PathLike = str | os.PathLike
TEMP_PREFIX = ".oq-"  # the temporary folders beside outputs
SPECIAL_TREES = ("/dev", "/proc", "/sys")  # paths there are streams or kernel files, never outputs
DATA_SUFFIXES = (".calib.npz", ".eval.npz")  # the data files found beside a model by default
INDEX = "index.json"  # a --dump-qubo / --load-solution folder's index (exchange.py)
PROBLEM_SUFFIX, SOLUTION_SUFFIX = ".qubo.npz", ".solution.npy"  # its problems and solutions


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
        links = candidate.stat().st_nlink
        if links > 1:
            raise ModelError(f"{where}, a file with {links} hard links, which onnx refuses to read (its guard against "
                             "hard-link attacks); give the model a copy of its own")
        needed = max(info.offset or 0, 0) + (info.length or tensor_bytes(tensor))
        if needed > candidate.stat().st_size:
            raise ModelError(f"{where} up to byte {needed}, past the end of that file "
                             f"({candidate.stat().st_size} bytes)")
        files[candidate.resolve()] = None
    return list(files)


def solution_files(directory: Path) -> list[Path]:
    """The files a run loading solutions from ``directory`` may read (exchange.py's format): its
    index, and every problem and solution in it (whatever the index names, only those can be read)."""
    if not directory.is_dir():
        return []
    return [path for path in directory.iterdir()
            if path.name == INDEX or path.name.endswith((PROBLEM_SUFFIX, SOLUTION_SUFFIX))]


def inputs_read(model: Any, calibration: Any = None, evaluation: Any = None,
                load_solution: PathLike | None = None) -> dict[Path, str]:
    """The files a run reads or may read, resolved, each with what it is: the model (when a
    path), its external data files, the ``<stem>.calib.npz`` / ``<stem>.eval.npz`` beside it,
    the data sources that are paths, and the index, problems and solutions in the
    ``load_solution`` folder (other sources, and paths that do not exist, are skipped). What it
    is may name an option as ``{name}`` (errors.py)."""
    reads: dict[Path, str] = {}
    data = [calibration, evaluation]
    if isinstance(model, (str, os.PathLike)) and Path(model).is_file():
        model = Path(model)
        reads[model.resolve()] = "the input model"
        try:
            for path in external_data_files(onnx.load(model, load_external_data=False), model):
                reads[path] = "external data of the input model"
        except (DecodeError, ValueError, OSError, RuntimeError, ModelError):
            pass  # load_model gives the clear error when the run loads it
        data += [model.with_name(model.stem + suffix) for suffix in DATA_SUFFIXES]
        for path in genai_files(model):
            reads.setdefault(path, "a file of the input's onnxruntime-genai folder")
    for path in (Path(d) for d in data if isinstance(d, (str, os.PathLike))):
        if path.exists():
            reads.setdefault(path.resolve(), "a data file")
    if load_solution is not None:
        for path in solution_files(Path(load_solution)):
            reads.setdefault(path.resolve(), "a {load_solution} file")
    return reads


GENAI_CONFIG = "genai_config.json"  # marks an onnxruntime-genai folder
GENAI_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")  # its tokenizer and configuration files


def genai_files(model_path: Path) -> list[Path]:
    """The configuration and tokenizer files of the onnxruntime-genai folder that holds
    ``model_path`` (``genai_config.json`` and the files ending in GENAI_SUFFIXES beside it, data
    files apart), resolved; none when its folder holds no ``genai_config.json``."""
    folder = model_path.resolve().parent
    if not (folder / GENAI_CONFIG).is_file():
        return []
    return sorted(path.resolve() for path in folder.iterdir()
                  if path.is_file() and path.name.endswith(GENAI_SUFFIXES) and not path.name.endswith(DATA_SUFFIXES))


def genai_folder(model_path: Path | None, output_path: Path, *, reads: Mapping[Path, str],
                 writes: Mapping[Path, str]) -> tuple[dict[Path, bytes], list[str]]:
    """The files that make the output's folder a complete onnxruntime-genai folder when the input
    model's folder is one: each of ``genai_files`` under its own name beside the output, their
    contents (``genai_config.json`` with the model's file name changed to the output's where it
    named the input's), and notes for the report. Nothing when the output is written into the
    input's folder (its files are the input's: never replaced); each target is checked by
    ``writable_path`` and against the run's other ``writes``."""
    sources = [] if model_path is None else genai_files(model_path)
    if not sources:
        return {}, []
    assert model_path is not None
    folder = Path(os.path.abspath(output_path)).parent
    if folder.resolve() == model_path.resolve().parent:
        return {}, [f"the output is in the input's onnxruntime-genai folder: its {GENAI_CONFIG} and tokenizer files "
                    "are left as they are (they name the input model); write the output to another folder to get a "
                    "complete folder"]
    files: dict[Path, bytes] = {}
    for source in sources:
        target = writable_path(folder / source.name, reads=reads, what="onnxruntime-genai file")
        for other, what in writes.items():
            if os.path.abspath(target) == os.path.abspath(other):
                raise _output_error(f"onnxruntime-genai file '{target}' is also the {what}; give it another name",
                                    what)
        files[target] = source.read_bytes()
    config = folder / GENAI_CONFIG
    files[config], renamed = _renamed_model(files[config], model_path.name, output_path.name)
    notes = [f"onnxruntime-genai folder: {', '.join(sorted(path.name for path in files))} written beside the output"
             + (f" ({GENAI_CONFIG} names '{output_path.name}')" if renamed else "")]
    return files, notes


def _renamed_model(config: bytes, old: str, new: str) -> tuple[bytes, bool]:
    """``config`` (a genai_config.json) with ``model.decoder.filename`` ``old`` set to ``new``."""
    if old == new:
        return config, False
    try:
        parsed = json.loads(config)
        decoder = parsed["model"]["decoder"]
    except (ValueError, KeyError, TypeError):
        return config, False
    if not isinstance(decoder, dict) or decoder.get("filename") != old:
        return config, False
    decoder["filename"] = new
    return (json.dumps(parsed, indent=4) + "\n").encode(), True


def dump_directory(path: PathLike, *, reads: Mapping[Path, str], writes: Mapping[Path, str] | None = None) -> Path:
    """``path`` as a directory the QUBO dump may write ``index.json`` and ``*.qubo.npz`` into:
    a new or existing directory holding none of the files this run reads (``reads``) or the
    run's other outputs (``writes``, each with the option naming it) under those names."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{{dump_qubo}} '{path}' exists and is not a directory", "dump_qubo")

    def dumped(file: Path) -> bool:
        return (Path(os.path.abspath(file)).parent.resolve() == directory.resolve()
                and (file.name == "index.json" or file.name.endswith(".qubo.npz")))
    for read, role in reads.items():
        if dumped(read):
            raise _output_error(f"{{dump_qubo}} '{path}' holds '{read.name}', {role} this run reads, which the "
                                "dump would replace; choose another directory", "{dump_qubo}", role)
    for written, what in (writes or {}).items():
        if dumped(written):
            raise _output_error(f"{{dump_qubo}} '{path}' would also write '{written.name}', the {what}; "
                                "choose another directory", "{dump_qubo}", what)
    return directory


def writable_path(path: PathLike, *, reads: Collection[Path], what: str) -> Path:
    """``path`` as a Path if this run may write ``what`` there, else an OutputError: not a file
    the run reads, not a directory (or a name ending in a separator), not a device, FIFO or
    socket (nor a symlink to one), in an existing, writable folder."""
    try:
        return _check_writable(os.fspath(path), reads, what)
    except OSError as exc:  # e.g. a name too long for the file system
        raise _output_error(f"{what} '{os.fspath(path)}' cannot be written: {exc.strerror or exc}", what) from None


def _check_writable(text: str, reads: Collection[Path], what: str) -> Path:
    target = Path(text)
    shown = f"{what} '{text}'"
    if text.endswith(("/", os.sep)) or target.is_dir():
        raise _output_error(f"{shown} is a directory; give a file path", what)
    absolute = Path(os.path.abspath(text))
    if any(absolute.is_relative_to(tree) or target.resolve().is_relative_to(tree) for tree in SPECIAL_TREES):
        raise _output_error(f"{shown} is a device or kernel file, not a regular file", what)
    resolved = target.resolve()
    for read in reads:
        if resolved == Path(read).resolve() or _same_file(target, Path(read)):
            role = reads[read] if isinstance(reads, Mapping) else "a file"
            raise _output_error(f"{shown} is {role} this run reads; choose another path "
                                "(inputs are never overwritten)", what, role)
    if target.is_symlink() or target.exists():
        try:
            mode = os.stat(target).st_mode
        except OSError as exc:
            raise _output_error(f"{shown}: {exc.strerror}", what) from None
        if not stat.S_ISREG(mode):
            raise _output_error(f"{shown} exists and is not a regular file (a device, FIFO or socket)", what)
    parent = absolute.parent
    if not parent.is_dir():
        raise _output_error(f"{shown}: directory '{parent}' does not exist", what)
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise _output_error(f"{shown} is not writable", what)
    return target


def _same_file(a: Path, b: Path) -> bool:
    """Whether two existing paths are one file (hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _output_error(message: str, *named: str) -> OutputError:
    """An OutputError for ``message``, which holds ``named`` texts (what is written, what a file
    read is) that may name options as ``{name}``."""
    return OutputError(message, *dict.fromkeys(m for text in named for m in re.findall(r"\{(\w+)\}", text)))


def write_atomically(path: Path, data: bytes, what: str = "output") -> None:
    """Write ``data`` to ``path`` as a unit of one file (``Outputs``): a symlink at ``path`` is
    replaced, never written through."""
    with Outputs() as outputs:
        outputs.add(path, data, what)


def external_data_path(path: Path) -> Path:
    """Where a written model's external data goes: ``<name>.data`` beside it."""
    return path.with_name(path.name + ".data")


class Outputs:
    """Files written as one unit: ``add`` stages each in a temporary folder beside its target;
    leaving the ``with`` block renames them all into place in the order added (``commit``), or,
    on an exception, none. While it is open SIGTERM raises KeyboardInterrupt, so the staged
    files are removed as for Ctrl-C."""

    def __init__(self) -> None:
        self.staging: dict[Path, Path] = {}  # target folder -> its temporary folder
        self.files: list[tuple[Path, Path, str]] = []  # (staged, target, what), in rename order
        self.signals = _sigterm_raises()

    def __enter__(self) -> Outputs:
        self.signals.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            if kind is None:
                self.commit()
        finally:
            for folder in self.staging.values():
                shutil.rmtree(folder, ignore_errors=True)
            self.signals.__exit__(kind, error, traceback)

    def stage(self, path: PathLike, what: str) -> Path:
        """Where to write the file that becomes ``path`` (``what``, for messages) at commit."""
        target = Path(path)
        folder = Path(os.path.abspath(target)).parent
        for _, other, other_what in self.files:
            if os.path.abspath(other) == os.path.abspath(target):
                raise _output_error(f"{what} '{target}' is also the {other_what}; give each its own path",
                                    what, other_what)
        if folder not in self.staging:
            try:
                self.staging[folder] = Path(tempfile.mkdtemp(dir=folder, prefix=TEMP_PREFIX))
                (self.staging[folder] / "new").mkdir()
                (self.staging[folder] / "old").mkdir()
            except OSError as exc:
                raise _output_error(f"{what} '{target}': cannot create a folder in '{folder}': {exc.strerror}",
                                    what) from None
        staged = self.staging[folder] / "new" / target.name
        self.files.append((staged, target, what))
        return staged

    def add(self, path: PathLike, data: bytes, what: str) -> Path:
        """Stage ``data`` to be written to ``path``."""
        staged = self.stage(path, what)
        try:
            with open(staged, "xb") as out:  # opened as any new file is: mode 0666 less the umask
                out.write(data)
        except OSError as exc:
            raise _output_error(f"{what} '{path}' cannot be written: {exc.strerror or exc}", what) from None
        return Path(path)

    def add_model(self, path: Path, model: onnx.ModelProto, *, external_data: bool,
                  reads: Collection[Path]) -> list[Path]:
        """Stage ``model`` to be written to ``path``, its tensors to ``<name>.data`` beside it when
        asked or when the model would pass protobuf's 2 GB limit; returns the files. With
        external data the model's tensors are moved out of ``model``: stage it last. Tensors
        ``model`` still reads from the input's external data are copied in."""
        external.materialize(model)
        if not external_data and model.ByteSize() < PROTOBUF_LIMIT:
            return [self.add(path, model.SerializeToString(), "output")]
        data_path = writable_path(external_data_path(path), reads=reads, what="external data")
        staged_data = self.stage(data_path, "external data")  # renamed first: the model reads it
        staged = self.stage(path, "output")
        for tensor in _initializers(model.graph):  # as onnx.save_model(save_as_external_data=True) would,
            if tensor.HasField("raw_data"):  # without its check for the data file in the working folder
                set_external_data(tensor, data_path.name)
        try:
            onnx.save_model(model, staged)
            if not staged_data.exists():  # no tensor to move: an empty file replaces an older one
                staged_data.touch()
            os.chmod(staged_data, stat.S_IMODE(staged.stat().st_mode))  # onnx creates it 0600
        except OSError as exc:
            raise _output_error(f"output '{path}' cannot be written: {exc.strerror or exc}") from None
        return [path, data_path]

    def size(self, paths: Collection[Path]) -> int:
        """The bytes staged for ``paths``."""
        return sum(staged.stat().st_size for staged, target, _ in self.files if target in paths)

    def commit(self) -> None:
        """Rename every staged file into place, keeping each file replaced (a hard link, or the
        file itself renamed aside where hard links are not supported) until all are in place: an
        exception, or SIGINT/SIGTERM (deferred meanwhile), puts every target back as it was."""
        done: list[tuple[Path, Path | None]] = []  # (target, where the file it replaces is kept)
        with _signals_deferred() as received:
            try:
                for staged, target, what in self.files:
                    kept = staged.parent.parent / "old" / staged.name if os.path.lexists(target) else None
                    done.append((target, kept))
                    try:
                        if kept is not None:
                            _keep(target, kept)
                        os.replace(staged, target)
                    except OSError as exc:
                        raise _output_error(f"{what} '{target}' cannot be written: {exc.strerror or exc}",
                                            what) from None
            except BaseException:
                _put_back(done)
                raise
            if received:
                _put_back(done)
        if received:
            raise KeyboardInterrupt(f"signal {received[0]}")


def _keep(target: Path, kept: Path) -> None:
    """Keep the file at ``target`` (a symlink itself, not what it points to) at ``kept``."""
    try:
        os.link(target, kept, follow_symlinks=False)
    except (OSError, NotImplementedError):  # no hard links here: move it aside (absent until replaced)
        os.replace(target, kept)


def _put_back(done: list[tuple[Path, Path | None]]) -> None:
    """Undo renames: each target back to the file it held, or removed when it held none."""
    for target, kept in reversed(done):
        try:
            if kept is None:
                os.unlink(target)
            elif os.path.lexists(kept):
                os.replace(kept, target)
        except OSError:
            pass  # nothing better to do: the rest are still put back


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _initializers(attribute.g)
            for sub in attribute.graphs:
                yield from _initializers(sub)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """While active (main thread only), SIGINT and SIGTERM are recorded in the list it gives
    instead of acting; signals that are ignored stay ignored."""
    received: list[int] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (int(signal.SIGINT), int(signal.SIGTERM)):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


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
    raise Interrupted(signum)
