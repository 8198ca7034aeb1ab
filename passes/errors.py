"""The errors the passes raise. They name the pass, node or tensor at fault; a caller maps them
to its own errors (onnx_qubo: ``lowering.run_passes``).

    PassError            base: anything a pass refuses or cannot do
      UnsupportedModel   the model is one the pass cannot handle (e.g. an opset onnx cannot
                         raise, external data without a reader): the input's fault
      PassFailed         a pass failed for a reason not its own (onnx, a lowering or a reader
                         it was given raised): ``run_passes`` names the pass, ``__cause__`` is
                         the original exception
"""

from __future__ import annotations


class PassError(Exception):
    """Base of every error the passes raise on purpose."""


class UnsupportedModel(PassError, ValueError):
    """The model is one the pass cannot handle; the message names what and where."""


class PassFailed(PassError):
    """A pass failed with an exception of another kind, kept as ``__cause__``."""
