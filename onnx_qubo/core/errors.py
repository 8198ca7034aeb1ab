"""The exceptions the library raises, one type per kind of failure, each stated in one line.

The library speaks in its own terms (option names as the API spells them, file paths, node
and layer names); the CLI maps each type to an exit status and each option to its flag.

    QuboError                      base: anything the library refuses or cannot do
      QuboInputError               bad input from the caller (exit 1)
        ModelError                 the model file or graph (not ONNX, no layers, NaN weights,
                                   external data missing or outside the model's folder)
        DataError                  calibration / evaluation data
        OptionError                an option value or combination; ``option`` names it
        OutputError                a path the run may not write (the input, a data file,
                                   not a regular file, not writable)
      SolverLimitError             a solver cannot take this problem (exit 3)
      RuntimeFailure               onnxruntime or onnx cannot load, run or check a model we
                                   built (exit 4): a bug or a runtime limit, never the user's
      WorkerError                  a worker process or Ray task died or failed (exit 5)
    Interrupted                    SIGINT or SIGTERM (a KeyboardInterrupt, not a QuboError;
                                   the CLI exits 128 + the signal: 130, 143)
"""

from __future__ import annotations

import re
from typing import Mapping


class QuboError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = 1


class QuboInputError(QuboError, ValueError):
    """Bad input (model, data, option or path). The message names the node, file or option at fault."""

    exit_code = 1


class ModelError(QuboInputError):
    """The model: unreadable, not ONNX, nothing to quantize, bad weights or external data."""


class DataError(QuboInputError):
    """Calibration or evaluation data that does not fit the model."""


class NamesOptions(Exception):
    """A message that names API options as ``{name}``, which the API shows as the name itself and
    a front end as its own spelling (``render``), e.g. ``--block-size``; ``options`` are those
    names."""

    def __init__(self, template: str, *options: str):
        self.template, self.options = template, options
        super().__init__(self.render({}))

    def render(self, names: Mapping[str, str]) -> str:
        """The message with each ``{option}`` spelled as ``names`` says (default: as is)."""
        return re.sub(r"\{(\w+)\}", lambda m: names.get(m[1], m[1]) if m[1] in self.options else m[0],
                      self.template)


class OptionError(NamesOptions, QuboInputError):
    """An option value or a combination of options (``bits``, ``block_size``...)."""


class OutputError(NamesOptions, QuboInputError):
    """A path the run was asked to write but may not: never a file the run reads (the input
    model, its external data, the data, a solution), nor anything that is not a regular file or
    a new path. The option that names the path, and the one that names the file read, are
    ``options``."""


class SolverLimitError(QuboError):
    """A solver cannot take this problem (e.g. the exact solver past its size limit)."""

    exit_code = 3


class RuntimeFailure(QuboError):
    """onnxruntime or onnx cannot load, run or check a model this library built."""

    exit_code = 4


class WorkerError(QuboError):
    """A worker process or a Ray task died (killed, out of memory, its node lost) or failed
    with an error that is not the library's own."""

    exit_code = 5


class Interrupted(KeyboardInterrupt):
    """The run was stopped by signal ``signum`` (SIGTERM, or SIGINT where the CLI raises it): a
    KeyboardInterrupt, so every cleanup that Ctrl-C runs (worker processes, a Ray cluster,
    temporary files) runs for it too; the CLI exits with 128 + ``signum``."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"signal {signum}")
