"""Run calibration data through the model and stream each dense layer's input statistics.

One onnxruntime session (graph optimizations off, so no fusion hides a tensor) exposes every
layer input as an extra output. Per input view (``types.InputView``, provided by the form that
found the layer: a tensor's last axis, shared by the layers reading it; a Conv's im2col patches;
a recurrent node's gate inputs) the view's accumulator (grams.py) sums, in float64,
``G = E[z z^T]`` with ``z = [x; 1]``: memory O(f^2) whatever the number of samples (the running
sum of IST-DASLab/gptq's ``add_batch``).

Where the data marks padded positions (``Dataset.padding_mask``, padding.py), the views whose
vectors are positions over the mask's [batch, sequence] axes leave them out.

When the quantized layer will see other inputs ``x~`` than the float model's ``x`` (its input
is quantized, or earlier layers are: ``--sequential``), z is built from x~, the target stays
the float output, and two more sums make the objective exact (DESIGN.md's ``P = E[z y^T]``
in another form): ``E[z d^T]`` and ``E[d d^T]`` with ``d = x - x~``.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx

from ..core.determinism import map_threads, one_blas_thread
from ..core.errors import DataError
from ..core.grid import InputQuantizer
from ..core.progress import Progress
from ..core.types import Accumulator, DenseLayer, InputStatistics
from ..graph.runtime import NONE, ORT_ERRORS, make_session, run_session
from ..graph.subgraphs import Exposed, expose, keep_only
from .data import Dataset

CAPTURE_BYTES = 128 * 2 ** 20  # captured layer inputs one calibration run may hold
PROBE_SAMPLES = 1  # the first run's samples, from which the pieces are sized (an LM window captures ~0.1 GB)


def stream_inputs(model: onnx.ModelProto, names: Iterable[str], dataset: Dataset,
                  what: str, built: bool = False) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Per batch of ``dataset`` (or piece of one), its number of samples and each named tensor of
    ``model`` as onnxruntime gives it; a tensor inside a Loop/Scan body with the rows of every
    iteration, one inside an If branch empty when the branch did not run (subgraphs.expose).

    A run holds every captured tensor of its samples at once (a CNN's feature maps: gigabytes
    for a batch of 256 images), so batches are run in pieces whose captured tensors stay within
    CAPTURE_BYTES, sized from a first run of PROBE_SAMPLES samples (when the data allows, and the
    graph runs on that many: a constant state may fix the batch size without the inputs saying so).
    A run that fails is one line naming the node (runtime.run_session; ``built``: a model this
    library built)."""
    names = list(dict.fromkeys(names))
    fed = set(dataset.batches[0])  # graph inputs: read from the feed, not captured
    captured = [name for name in names if name not in fed]
    exposed_model, exposed = expose(model, captured)  # a copy
    outputs = [output for name in captured for output in exposed[name].outputs]
    if outputs:  # (a model that outputs nothing does not load; with nothing captured it is not run)
        keep_only(exposed_model, outputs)
    session = make_session(exposed_model, NONE, f"{what} with layer inputs exposed", lean=True)
    size = None if captured and dataset.splittable else 0  # samples per run; 0: whole batches
    for batch in dataset.batches:
        count, start = dataset.samples(batch), 0
        while start < count:
            stop = count if size == 0 else min(count, start + (size or PROBE_SAMPLES))
            piece = batch if (start, stop) == (0, count) else dataset.piece(batch, start, stop)
            if size is None:
                try:
                    values = session.run(outputs, piece)
                except ORT_ERRORS:  # a batch size the graph fixes elsewhere (a constant initial state): whole batches
                    size, stop, piece = 0, count, batch
                    values = run_session(session, outputs, piece, what, dataset.origin, built)
                else:
                    per_sample = sum(value.nbytes for value in values) / (stop - start)
                    size = max(1, int(CAPTURE_BYTES // max(per_sample, 1.0)))
            else:
                values = run_session(session, outputs, piece, what, dataset.origin, built) if captured else []
            found = _captured(exposed, dict(zip(outputs, values)), what)
            inputs = {}
            for name in names:
                x = piece[name] if name in piece else found[name]
                if not np.isfinite(x).all():
                    raise DataError(f"the input '{name}' of a dense layer holds NaN or Inf in {what} "
                                    f"on the calibration data ({dataset.origin})")
                inputs[name] = x
            yield stop - start, inputs
            start = stop


def _captured(exposed: Mapping[str, Exposed], values: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Each captured tensor's rows from the exposed model's ``values`` (by output name)."""
    found = {}
    for name, where in exposed.items():
        try:
            found[name] = where.rows(*(values[output] for output in where.outputs))
        except ValueError as exc:
            raise DataError(f"the input '{name}' of a dense layer cannot be calibrated in {what}: {exc}") from None
    return found


@one_blas_thread()
def collect_statistics(model: onnx.ModelProto, layers: list[DenseLayer], dataset: Dataset,
                       progress: Progress, deployed: onnx.ModelProto | None = None,
                       quantizers: Mapping[str, InputQuantizer] | None = None, spread: bool = False) -> ViewSums:
    """Map each layer's ``statistics_key`` to the statistics of its input vectors over ``dataset``.

    ``deployed``: a model computing the inputs the quantized layers will see (the float model
    with earlier layers quantized), run beside ``model`` on the same batches; ``quantizers``:
    input tensor name -> the quantization applied to that input in the deployed graph;
    ``spread``: measure the samples' spread too (``--damping auto``).
    """
    views = {layer.source_key: layer for layer in layers}
    quantizers = dict(quantizers or {})
    tensors = {name for layer in layers for name in layer.input_tensors}
    mismatch = deployed is not None or bool(quantizers.keys() & tensors)
    padding = dataset.padding_mask  # a graph input: streamed from the feed
    streamed = tensors | ({padding} if padding is not None else set())
    sums = {key: layer.view.accumulator(layer.shape[1], mismatch, layer.owner, spread) for key, layer in views.items()}
    streams = [stream_inputs(expose_outputs(model, layers), streamed, dataset, "the float model")]
    if deployed is not None:
        streams.append(stream_inputs(expose_outputs(deployed, layers), streamed, dataset,
                                     "the partly quantized model", built=True))

    per_position: dict[str, bool] = {}  # a view's input is [batch, sequence, ...], as the first non-square mask shows

    def update(key: str, *, floats: dict[str, np.ndarray], seen: dict[str, np.ndarray], samples: int) -> None:
        layer = views[key]
        name = layer.input_name
        x_seen = None
        if mismatch:
            x_seen = layer.view.vectors(seen[name] if name not in quantizers else
                                        quantizers[name].fake_quantize(seen[name]), seen)
        vectors = layer.view.vectors(floats[name], floats)
        mask = floats[padding] if padding is not None and layer.view.positions else None
        if mask is not None:
            matches = mask.shape == vectors.shape[:-1]
            # a square mask also fits a [sequence, batch] (time-major) input; an empty one (If not taken) tells nothing
            if mask.shape[0] != mask.shape[1] and vectors.size:
                per_position.setdefault(key, matches)
            if not (matches and per_position.get(key, True)):
                mask = None  # not per position of the masked sequence (pooled, flattened, time-major): all count
        sums[key].update(vectors, x_seen, samples, mask)

    # each view's sums on one thread at a time, in batch order: the same bits for any thread count
    with progress.bar(dataset.num_samples, "calibrating") as bar:
        for pieces in zip(*streams):
            (samples, floats), (_, seen) = pieces[0], pieces[-1]
            map_threads(partial(update, floats=floats, seen=seen, samples=samples), views)
            bar.update(samples)
    return ViewSums({layer.statistics_key: (sums[layer.source_key], layer.group) for layer in layers})


class ViewSums(Mapping[str, InputStatistics]):
    """Each layer's input statistics by ``statistics_key``, made from its view's sums when asked
    for (a dense view's Gram matrix is unpacked then: the caller holds one layer's at a time);
    ``release`` drops a key, and a view's sums go with its last key."""

    def __init__(self, sums: dict[str, tuple[Accumulator, int | None]]):
        self.sums = sums

    def __getitem__(self, key: str) -> InputStatistics:
        accumulator, group = self.sums[key]
        return accumulator.statistics(group)

    def __contains__(self, key: object) -> bool:
        return key in self.sums

    def release(self, key: str) -> None:
        self.sums.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sums)

    def __len__(self) -> int:
        return len(self.sums)


class LayerStatistics(Mapping[str, InputStatistics]):
    """Each layer's input statistics by ``statistics_key``, gathered in as few passes over the
    data as the memory budget allows (memory.calibration_groups): a group's pass runs when one of
    its layers is first asked for, and only one group is held at a time. With one group (the
    statistics fit), everything is gathered in one pass and kept. ``spread``: as collect_statistics."""

    def __init__(self, model: onnx.ModelProto, groups: list[list[DenseLayer]], dataset: Dataset,
                 progress: Progress, quantizers: Mapping[str, InputQuantizer], spread: bool = False):
        self.model, self.groups, self.dataset = model, groups, dataset
        self.progress, self.quantizers, self.spread = progress, quantizers, spread
        self.group_of = {layer.statistics_key: g for g, group in enumerate(groups) for layer in group}
        self.held = ViewSums({})
        self.passes = 0  # passes over the calibration data so far

    def __getitem__(self, key: str) -> InputStatistics:
        if key not in self.held:
            group = self.groups[self.group_of[key]]
            self.held = ViewSums({})  # freed before the next group's sums are allocated
            self.held = collect_statistics(self.model, group, self.dataset, self.progress,
                                           quantizers=self.quantizers, spread=self.spread)
            self.passes += 1
        return self.held[key]

    def release(self, key: str) -> None:
        """Free ``key``'s statistics once no layer will ask for them again (a language model's
        120 views hold 0.4 GB of Gram matrices: each goes once its last layer is solved)."""
        self.held.release(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.group_of)

    def __len__(self) -> int:
        return len(self.group_of)


def expose_outputs(model: onnx.ModelProto, layers: list[DenseLayer]) -> onnx.ModelProto:
    """``model``, or a copy whose nodes write the outputs their layers' views read but they do
    not write (``InputView.unwritten``: a recurrent node's Y), under the views' names."""
    unwritten = {layer.weight_name: layer.view.unwritten for layer in layers if layer.view.unwritten is not None}
    if not unwritten:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if len(node.input) > 1 and node.input[1] in unwritten:
            if not node.output:
                node.output.append("")
            node.output[0] = unwritten[node.input[1]]
    return copy
