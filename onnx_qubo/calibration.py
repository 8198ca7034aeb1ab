"""Run calibration data through the model and stream each dense layer's input statistics.

One onnxruntime session (graph optimizations off, so no fusion hides a tensor) exposes every
layer input as an extra output. Per distinct input tensor we accumulate, in float64,
``G = E[z z^T]`` with ``z = [x; 1]``: memory O(f^2) whatever the number of samples (the
running sum of IST-DASLab/gptq's ``add_batch``).

When the quantized layer will see other inputs ``x~`` than the float model's ``x`` (its input
is quantized, or earlier layers are: ``--sequential``), z is built from x~, the target stays
the float output, and two more sums make the objective exact (DESIGN.md's ``P = E[z y^T]``
in another form): ``E[z d^T]`` and ``E[d d^T]`` with ``d = x - x~``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import onnx

from .data import Dataset
from .errors import DataError
from .grid import InputQuantizer
from .progress import Progress
from .runtime import NONE, make_session
from .types import DenseLayer


@dataclass(frozen=True, eq=False)
class InputStatistics:
    """Second moments of one dense-layer input (f features), bias column appended."""

    gram: np.ndarray  # [f+1, f+1] = E[z z^T], z = [x~; 1]
    count: int  # number of input vectors (rows after flattening leading axes)
    cross: np.ndarray | None = None  # [f+1, f] = E[z d^T], d = x - x~ (None: x~ = x)
    drift: np.ndarray | None = None  # [f, f] = E[d d^T]

    @property
    def x_gram(self) -> np.ndarray:
        """E[x~ x~^T], the block that weights the rounding error while the bias stays float."""
        return self.gram[:-1, :-1]


def stream_inputs(model: onnx.ModelProto, widths: Mapping[str, int], dataset: Dataset,
                  what: str) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of ``dataset``, each named tensor of ``model`` as [rows, f] float64."""
    fed = set(dataset.batches[0])  # graph inputs: read from the feed, not captured
    captured = [name for name in widths if name not in fed]
    session = make_session(_expose(model, captured), NONE, f"{what} with layer inputs exposed")
    for batch in dataset.batches:
        outputs = dict(zip(captured, session.run(captured, batch) if captured else []))
        inputs = {}
        for name, f in widths.items():
            x = (batch[name] if name in batch else outputs[name]).reshape(-1, f)
            if not np.isfinite(x).all():
                raise DataError(f"the input '{name}' of a dense layer holds NaN or Inf in {what} "
                                     f"on the calibration data ({dataset.origin})")
            inputs[name] = x.astype(np.float64)
        yield inputs


def collect_statistics(model: onnx.ModelProto, layers: list[DenseLayer], dataset: Dataset,
                       progress: Progress, deployed: onnx.ModelProto | None = None,
                       quantizers: Mapping[str, InputQuantizer] | None = None) -> dict[str, InputStatistics]:
    """Map each layer input tensor name to its statistics over ``dataset``.

    ``deployed``: a model computing the inputs the quantized layers will see (the float model
    with earlier layers quantized), run beside ``model`` on the same batches; ``quantizers``:
    input tensor name -> the quantization applied to that input in the deployed graph.
    """
    widths = {layer.input_name: layer.shape[1] for layer in layers}
    quantizers = dict(quantizers or {})
    mismatch = deployed is not None or bool(quantizers.keys() & widths.keys())
    sums = {name: np.zeros((f + 1, f + 1)) for name, f in widths.items()}
    cross = {name: np.zeros((f + 1, f)) for name, f in widths.items()} if mismatch else {}
    drift = {name: np.zeros((f, f)) for name, f in widths.items()} if mismatch else {}
    counts = dict.fromkeys(widths, 0)
    streams = [stream_inputs(model, widths, dataset, "the float model")]
    if deployed is not None:
        streams.append(stream_inputs(deployed, widths, dataset, "the partly quantized model"))
    with progress.bar(len(dataset.batches), "calibrating") as bar:
        for batches in zip(*streams):
            floats, seen = batches[0], batches[-1]
            for name in widths:
                x = floats[name]
                x_seen = seen[name] if name not in quantizers else quantizers[name].fake_quantize(seen[name])
                z = np.hstack([x_seen.astype(np.float64), np.ones((len(x), 1))])
                sums[name] += z.T @ z
                if mismatch:
                    d = x - x_seen
                    cross[name] += z.T @ d
                    drift[name] += d.T @ d
                counts[name] += len(x)
            bar.update(1)
    return {name: InputStatistics(sums[name] / counts[name], counts[name],
                                  cross[name] / counts[name] if mismatch else None,
                                  drift[name] / counts[name] if mismatch else None) for name in widths}


def _expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the given intermediate tensors."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {out.name for out in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return exposed
