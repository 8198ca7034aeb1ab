"""Reading models and writing outputs without ever leaving a partial file or touching the input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import QuboInputError


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise QuboInputError(f"model file '{path}' does not exist")
    try:
        model = onnx.load(path)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise QuboInputError(f"'{path}' is not a readable ONNX model: {exc}") from None
    if not model.graph.node:
        raise QuboInputError(f"'{path}' is not an ONNX model (its graph has no nodes)")
    return model


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None, flag: str) -> Path:
    """Fail early, before any long work, if ``output`` cannot be written or is the input."""
    output = Path(output)
    if input_path is not None and output.resolve() == Path(input_path).resolve():
        raise QuboInputError(f"{flag} '{output}' is the input model; choose another path "
                             "(the input is never overwritten)")
    if output.is_dir():
        raise QuboInputError(f"{flag} '{output}' is a directory; give a file path")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise QuboInputError(f"{flag} '{output}': directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise QuboInputError(f"{flag} '{output}' is not writable")
    return output


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``."""
    handle, temp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp's 0600 would surprise; use the usual mode
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
