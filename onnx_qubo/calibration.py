"""Run calibration data through the float model and stream each dense layer's input statistics.

One onnxruntime session (graph optimizations off, so no fusion hides a tensor) exposes every
layer input as an extra output. Per distinct input tensor we accumulate, in float64,
``G = E[z z^T]`` with ``z = [x; 1]``: memory O(f^2) whatever the number of samples (the
running sum of IST-DASLab/gptq's ``add_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .data import Dataset
from .errors import QuboInputError
from .progress import Progress
from .runtime import NONE, make_session
from .types import DenseLayer


@dataclass(frozen=True, eq=False)
class InputStatistics:
    """Second moments of one dense-layer input ``x`` (f features), bias column appended."""

    gram: np.ndarray  # [f+1, f+1] = E[z z^T], z = [x; 1]
    count: int  # number of input vectors (rows after flattening leading axes)

    @property
    def mean(self) -> np.ndarray:
        """E[x], the bias column of the augmented Gram matrix."""
        return self.gram[-1, :-1]

    @property
    def x_gram(self) -> np.ndarray:
        """E[x x^T], the block that weights the rounding error while the bias stays float."""
        return self.gram[:-1, :-1]


def collect_statistics(model: onnx.ModelProto, layers: list[DenseLayer], dataset: Dataset,
                       progress: Progress) -> dict[str, InputStatistics]:
    """Map each layer input tensor name to its statistics over ``dataset``."""
    widths = {layer.input_name: layer.shape[1] for layer in layers}
    fed = set(dataset.batches[0])  # graph inputs: read from the feed, not captured
    captured = [name for name in widths if name not in fed]
    session = make_session(_expose(model, captured), NONE, "the model with layer inputs exposed")
    sums = {name: np.zeros((f + 1, f + 1)) for name, f in widths.items()}
    counts = dict.fromkeys(widths, 0)
    with progress.bar(len(dataset.batches), "calibrating") as bar:
        for batch in dataset.batches:
            outputs = dict(zip(captured, session.run(captured, batch) if captured else []))
            for name, f in widths.items():
                x = (batch[name] if name in batch else outputs[name]).reshape(-1, f)
                if not np.isfinite(x).all():
                    raise QuboInputError(f"the input '{name}' of a dense layer holds NaN or Inf "
                                         f"on the calibration data ({dataset.origin})")
                z = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
                sums[name] += z.T @ z
                counts[name] += len(x)
            bar.update(1)
    return {name: InputStatistics(sums[name] / counts[name], counts[name]) for name in widths}


def _expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the given intermediate tensors."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {out.name for out in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return exposed
