"""Token windows from a text file, as calibration or evaluation data for a language model.

The text is tokenized whole with the model folder's ``tokenizer.json`` (Hugging Face's
``tokenizers`` library, the optional extra ``text``), without special tokens, and cut into
``windows`` windows of ``window`` tokens whose starts are ``stride`` tokens apart (default
``window``: no overlap), after leaving out the first ``skip`` windows. Calibration and
evaluation windows from one text thus never overlap when the evaluation's ``skip`` is the
calibration's ``windows`` (same window and stride, stride >= window). The result is saved as
``input_ids`` [windows, window] int64 in an .npz, written through files.py (never over the text
or the tokenizer).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DataError, ModelError, OptionError
from ..graph.files import writable_path, write_atomically

TOKENIZER_FILE = "tokenizer.json"


def tokenizer_path(source: str | os.PathLike) -> Path:
    """The tokenizer file: ``source`` itself, or ``tokenizer.json`` in the folder ``source``."""
    path = Path(source)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise ModelError(f"tokenizer '{path}' does not exist (give a model folder holding {TOKENIZER_FILE}, "
                         "or the file itself)")
    return path


def load_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` read from ``path``; an OptionError naming the extra when the
    ``tokenizers`` package is not installed."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OptionError("tokenizing text needs the 'tokenizers' package: pip install 'onnx-qubo[text]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception for a malformed file
        raise ModelError(f"tokenizer '{path}' cannot be read: {' '.join(str(exc).split())}") from None


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; a DataError naming the file otherwise."""
    if path.is_dir() or not path.is_file():
        raise DataError(f"text file '{path}' does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text file '{path}' is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"text file '{path}' cannot be read: {exc.strerror or exc}") from None


def cut_windows(tokens: np.ndarray, window: int, windows: int, stride: int | None = None, skip: int = 0,
                origin: str = "the text") -> np.ndarray:
    """Windows ``skip`` .. ``skip + windows - 1`` of ``window`` tokens, ``stride`` apart, as
    [windows, window] int64; a DataError when ``tokens`` is too short for them."""
    for name, value, least in (("window", window, 2), ("windows", windows, 1), ("skip", skip, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise OptionError(f"{{{name}}} must be an integer >= {least}, got {value!r}", name)
    stride = window if stride is None else stride
    if not isinstance(stride, (int, np.integer)) or isinstance(stride, bool) or stride < 1:
        raise OptionError(f"{{stride}} must be an integer >= 1, got {stride!r}", "stride")
    needed = (skip + windows - 1) * stride + window
    if needed > len(tokens):
        raise DataError(f"{origin} holds {len(tokens):,} tokens; {windows} window(s) of {window} tokens "
                        f"{stride} apart after skipping {skip} need {needed:,}: give more text, or fewer or "
                        "shorter windows")
    starts = (skip + np.arange(windows)) * stride
    return np.stack([tokens[start:start + window] for start in starts]).astype(np.int64)


def token_windows(tokenizer: str | os.PathLike, text: str | os.PathLike, *, window: int, windows: int,
                  stride: int | None = None, skip: int = 0) -> np.ndarray:
    """``text`` tokenized with ``tokenizer`` (a model folder or its tokenizer.json) and cut into
    windows (module docstring): input_ids [windows, window] int64."""
    path = tokenizer_path(tokenizer)
    loaded = load_tokenizer(path)
    content = read_text(Path(text))
    tokens = np.asarray(loaded.encode(content, add_special_tokens=False).ids, dtype=np.int64)
    return cut_windows(tokens, window, windows, stride, skip, origin=f"text file '{text}'")


def write_token_windows(tokenizer: str | os.PathLike, text: str | os.PathLike, output: str | os.PathLike, *,
                        window: int, windows: int, stride: int | None = None, skip: int = 0) -> np.ndarray:
    """``token_windows`` saved to ``output`` as an .npz keyed ``input_ids``; the output path is
    checked before the text is read (never the text, the tokenizer, a directory or a device)."""
    reads = {Path(text).resolve(): "the text file"}
    if Path(tokenizer).exists():
        reads[tokenizer_path(tokenizer).resolve()] = "the tokenizer"
    target = writable_path(output, reads=reads, what="output")
    ids = token_windows(tokenizer, text, window=window, windows=windows, stride=stride, skip=skip)
    buffer = io.BytesIO()
    np.savez(buffer, input_ids=ids)  # the name genai builder and torch exports give the tokens
    write_atomically(target, buffer.getvalue(), "output")
    return ids
