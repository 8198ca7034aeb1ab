"""Activation quantization: calibrate each quantized layer's input range on the float model,
and give it the per-tensor 8-bit quantizer (QuantizeLinear -> DequantizeLinear) it will run;
the same for the outputs of Convs that QLinearConv may run (it quantizes its output too),
in the same passes over the data.

``minmax`` spans the observed range; ``percentile`` clips it to the 0.001% and 99.999%
quantiles (read off a 2048-bin histogram of a second pass), so rare outliers do not coarsen
the grid for everything else.
"""

from __future__ import annotations

from typing import Collection

import numpy as np
import onnx

from ..core.grid import InputQuantizer
from ..core.options import Activations, RangeMethod
from ..core.progress import Progress
from ..core.types import DenseLayer
from .data import Dataset
from .statistics import stream_inputs

PERCENTILE = 99.999
HISTOGRAM_BINS = 2048


def input_quantizers(model: onnx.ModelProto, layers: list[DenseLayer], dataset: Dataset, activations: Activations,
                     method: RangeMethod, progress: Progress,
                     outputs: Collection[str] = ()) -> dict[str, InputQuantizer]:
    """Input tensor name (and each of ``outputs``, layer output tensors) -> its quantizer (none
    when ``activations`` is NONE)."""
    if activations == Activations.NONE:
        return {}
    names = list(dict.fromkeys([*(layer.input_name for layer in layers), *outputs]))
    ranges = _min_max(model, names, dataset, progress)
    if method == RangeMethod.PERCENTILE:
        ranges = _percentiles(model, dataset, ranges, progress)
    return {name: InputQuantizer.for_range(lo, hi, signed=activations == Activations.INT8)
            for name, (lo, hi) in ranges.items()}


def _min_max(model: onnx.ModelProto, names: list[str], dataset: Dataset,
             progress: Progress) -> dict[str, tuple[float, float]]:
    lo, hi = dict.fromkeys(names, np.inf), dict.fromkeys(names, -np.inf)
    with progress.bar(dataset.num_samples, "input ranges") as bar:
        for samples, inputs in stream_inputs(model, names, dataset, "the float model"):
            for name, x in inputs.items():
                if x.size:  # empty: an If branch that did not run on this batch
                    lo[name], hi[name] = min(lo[name], float(x.min())), max(hi[name], float(x.max()))
            bar.update(samples)
    return {name: (lo[name], hi[name]) for name in names if lo[name] <= hi[name]}  # a tensor never seen: none


def _percentiles(model: onnx.ModelProto, dataset: Dataset,
                 ranges: dict[str, tuple[float, float]], progress: Progress) -> dict[str, tuple[float, float]]:
    counts = {name: np.zeros(HISTOGRAM_BINS, dtype=np.int64) for name in ranges}
    with progress.bar(dataset.num_samples, "input histograms") as bar:
        for samples, inputs in stream_inputs(model, ranges, dataset, "the float model"):
            for name, x in inputs.items():
                counts[name] += np.histogram(x, HISTOGRAM_BINS, ranges[name])[0]
            bar.update(samples)
    result = {}
    for name, (lo, hi) in ranges.items():
        edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
        cdf = np.cumsum(counts[name]) / counts[name].sum()
        low_bin = int(np.searchsorted(cdf, 1.0 - PERCENTILE / 100.0))
        high_bin = int(np.searchsorted(cdf, PERCENTILE / 100.0))
        result[name] = (float(edges[low_bin]), float(edges[high_bin + 1]))
    return result
