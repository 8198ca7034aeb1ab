"""Run the float and the quantized model in onnxruntime on the same data and compare them.

The quantized model runs at onnxruntime's default level (what users get), at its basic level,
and with graph optimizations disabled: the last is the reference that shares none of
onnxruntime's graph rewrites (fusions that may compute something else than the graph says).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ..calibration.data import Dataset
from ..calibration.memory import weights_bytes
from ..core.errors import ModelError
from ..core.progress import Progress
from ..core.report import Evaluation, Speed
from ..graph.runtime import BASIC, DEFAULT, NONE, make_session, run_session
from ..graph.signature import model_inputs

SPEED_REPEATS = 10  # timed runs per model and batch (median), within SPEED_BUDGET seconds
SPEED_BUDGET = 3.0
RUN_INPUT_BYTES = 4 << 20  # fed to one onnxruntime run in evaluation and in the speed check's larger batch
INTERLEAVE_BYTES = 10 ** 9  # float weights above which the two models are timed one after the other

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}


def scores_output(model: onnx.ModelProto) -> str:
    """The output compared between models: the first floating-point one (class scores; a
    classifier exported by skl2onnx lists its integer label first), else the first."""
    for out in model.graph.output:
        if out.type.tensor_type.elem_type in FLOAT_TYPES:
            return out.name
    return model.graph.output[0].name


@dataclass(frozen=True, eq=False)
class Reference:
    """The float model's scores on the evaluation data, computed once per run; where the data
    marks padded positions and the scores are per position, those of the positions kept."""

    dataset: Dataset
    output: str
    scores: np.ndarray  # first axis = samples (the kept positions' rows where ``kept`` is set)
    kept: np.ndarray | None = None  # [samples, positions]: the positions the padding mask keeps

    def of(self, y: np.ndarray) -> np.ndarray:
        """Another model's output ``y`` over the same data, as the reference's scores are taken."""
        return y if self.kept is None else y[self.kept]

    @property
    def samples(self) -> int:
        """The samples the scores come from (sequences, where they are their kept positions')."""
        return len(self.scores) if self.kept is None else len(self.kept)

    @property
    def labels(self) -> np.ndarray | None:
        """The data's labels, per position kept where they are per position."""
        labels = self.dataset.labels
        if labels is None or self.kept is None or labels.shape != self.kept.shape:
            return labels
        return labels[self.kept]

    @property
    def has_labels(self) -> bool:
        """Whether the data's labels give one class per prediction (argmax of the scores)."""
        labels = self.labels
        return labels is not None and labels.shape == self.scores.shape[:-1]


def reference_scores(float_model: onnx.ModelProto, dataset: Dataset, progress: Progress) -> Reference:
    name = scores_output(float_model)
    scores = run_scores(float_model, DEFAULT, dataset, name, progress, "float model", built=False)
    kept = kept_positions(dataset, scores)
    return Reference(dataset, name, scores if kept is None else scores[kept], kept)


def kept_positions(dataset: Dataset, scores: np.ndarray) -> np.ndarray | None:
    """Where ``dataset`` marks padded positions (padding.py) and ``scores`` are per position
    ([samples, positions, ...]: a token classifier's, not one sequence's scores over its
    positions), the positions the mask keeps; else None. Scores whose first axis is not the
    batch are joined as rows (run_scores), except in one run: a [positions, samples, ...] output
    is then taken for per position only where there are as many samples as positions."""
    if dataset.padding_mask is None or scores.ndim < 3:
        return None
    mask = np.concatenate([batch[dataset.padding_mask] for batch in dataset.batches])
    return mask != 0 if mask.shape == scores.shape[:2] else None


def run_scores(model: onnx.ModelProto, level: ort.GraphOptimizationLevel, dataset: Dataset, name: str,
               progress: Progress, what: str, built: bool = True) -> np.ndarray:
    """The output ``name`` of ``model`` over ``dataset`` (``built``: a model this library wrote).
    An output whose first axis is not the batch (a CRNN's [time, batch, classes]) is joined as
    rows of its last axis: the measures compare the two models row by row."""
    session = make_session(model, level, f"the {what}", built, lean=True)
    rows_of_last_axis = False
    with progress.bar(len(dataset.batches), f"running the {what}") as bar:
        outputs = []
        for batch in dataset.batches:
            for piece in run_pieces(dataset, batch):
                output = run_session(session, [name], piece, f"the {what}", dataset.origin, built)[0]
                samples = dataset.samples(piece)
                rows_of_last_axis = rows_of_last_axis or output.shape[:1] != (samples,)
                outputs.append(output)
            bar.update(1)
    rows_of_last_axis = rows_of_last_axis and len(outputs) > 1
    if rows_of_last_axis:
        widths = {output.shape[-1] if output.ndim else 1 for output in outputs}
        if len(widths) > 1:
            raise ModelError(f"output '{name}' of the {what} has shape {outputs[-1].shape} for a batch of {samples} "
                             "samples: its first axis is not the batch and its last axis changes with the batch, "
                             "so batches cannot be joined; evaluate all samples in one batch (batch_size)")
        width = widths.pop()
        outputs = [output.reshape(-1, width) for output in outputs]
    joined = np.concatenate(outputs)  # kept in the output's type (float32: half the memory of float64)
    return joined.astype(np.promote_types(joined.dtype, np.float32), copy=False)


def run_pieces(dataset: Dataset, batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``batch`` in runs fed at most RUN_INPUT_BYTES of samples (at least one) where the data
    allows: onnxruntime's working memory (a run's intermediate tensors: a CNN's feature maps, tens
    of times its input) grows with the samples of a run. Runs stay as large as that allows, since
    every run of a DequantizeLinear model dequantizes all its weights again."""
    count = dataset.samples(batch)
    per_sample = sum(array.nbytes for name, array in batch.items() if dataset.axes.get(name, 0) is not None) / count
    size = max(1, int(RUN_INPUT_BYTES // max(per_sample, 1.0)))
    if not dataset.splittable or count <= size:
        return [batch]
    return [dataset.piece(batch, start, min(count, start + size)) for start in range(0, count, size)]


def evaluate(reference: Reference, quantized_model: onnx.ModelProto, progress: Progress,
             check_levels: bool = True, portable: onnx.ModelProto | None = None) -> Evaluation:
    """Accuracy (with labels), top-1 agreement and output error of the quantized model, run
    with onnxruntime's default session options, plus (``check_levels``) how far its basic level
    and its default level are from ``portable`` (the DequantizeLinear model of the same codes;
    default: the quantized model itself) run with graph optimizations disabled."""
    data, name = reference.dataset, reference.output
    y_float = reference.scores
    y_quant = reference.of(run_scores(quantized_model, DEFAULT, data, name, progress, "quantized model"))
    default_matches_basic, default_vs_basic, default_vs_plain, basic_vs_plain = True, 0.0, 0.0, 0.0
    pred_float, pred_quant = y_float.argmax(axis=-1), y_quant.argmax(axis=-1)
    if check_levels:  # one more output held at a time
        y_plain = reference.of(run_scores(quantized_model if portable is None else portable, NONE, data, name,
                                          progress, "portable model (no optimization)"))
        default_vs_plain = _relative(y_quant, y_plain)
        y_basic = reference.of(run_scores(quantized_model, BASIC, data, name, progress, "quantized model (basic)"))
        basic_vs_plain = _relative(y_basic, y_plain)
        del y_plain
        default_matches_basic = bool((y_basic.argmax(axis=-1) == pred_quant).all())
        default_vs_basic = _max_abs(y_basic, y_quant)
        del y_basic
    labels, has_labels = reference.labels, reference.has_labels
    return Evaluation(
        data=data.origin,
        output=name,
        samples=reference.samples,
        float_accuracy=float((pred_float == labels).mean()) if has_labels else None,
        quantized_accuracy=float((pred_quant == labels).mean()) if has_labels else None,
        top1_agreement=float((pred_float == pred_quant).mean()),
        relative_output_error=_relative(y_quant, y_float),
        default_matches_basic=default_matches_basic,
        default_vs_basic_max_diff=default_vs_basic,
        default_vs_unoptimized=default_vs_plain,
        basic_vs_unoptimized=basic_vs_plain,
        mean_cosine=_mean_cosine(y_float, y_quant),
        max_abs_error=_max_abs(y_quant, y_float),
        decision_flips=_decision_flips(y_float, y_quant),
        positions=None if reference.kept is None else (int(reference.kept.sum()), reference.kept.size),
        argmax_rows=int(pred_float.size),
        argmax_width=int(y_float.shape[-1]) if y_float.ndim else 1,
    )


CHUNK_VALUES = 1 << 22  # the measures run over rows holding about this many values at a time, in float64


def _chunks(y: np.ndarray) -> list[slice]:
    """Runs of rows of ``y`` with about CHUNK_VALUES values each (at least one row)."""
    per_row = max(1, y[:1].size)
    rows = max(1, CHUNK_VALUES // per_row)
    return [slice(start, start + rows) for start in range(0, max(len(y), 1), rows)]


def _mean_cosine(y_float: np.ndarray, y_quant: np.ndarray) -> float:
    """Mean over rows of the cosine between the two models' outputs: the fidelity of embeddings,
    which top-1 agreement says nothing about."""
    cosines = []
    for rows in _chunks(y_float):
        a = y_float[rows].reshape(len(y_float[rows]), -1).astype(np.float64)
        b = y_quant[rows].reshape(len(y_quant[rows]), -1).astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosines.append(np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-30))
    return float(np.concatenate(cosines).mean())


def _max_abs(y: np.ndarray, reference: np.ndarray) -> float:
    """max |y - reference| (NaN when either holds one)."""
    return float(np.max([np.abs(y[rows].astype(np.float64) - reference[rows]).max(initial=0.0) for rows in _chunks(y)]))


def _decision_flips(y_float: np.ndarray, y_quant: np.ndarray) -> float | None:
    """With one score per row (a probability, a wake word), the share of rows whose side of 0.5
    changes; None for other outputs."""
    if y_float.ndim > 1 and y_float.shape[-1] != 1:
        return None
    return float(((y_float > 0.5) != (y_quant > 0.5)).mean())


def _relative(y: np.ndarray, reference: np.ndarray) -> float:
    """||y - reference|| / ||reference|| (in float64, a chunk of rows at a time): robust to the odd
    input code that float rounding moves across a quantization step between two correct kernels."""
    error = total = 0.0
    for rows in _chunks(y):
        a, b = y[rows].astype(np.float64), reference[rows].astype(np.float64)
        error += float(np.sum((a - b) ** 2))
        total += float(np.sum(b ** 2))
    return float(np.sqrt(error) / max(np.sqrt(total), 1e-30))


def measure_speed(float_model: onnx.ModelProto, quantized_model: onnx.ModelProto, dataset: Dataset,
                  first_run: dict[str, np.ndarray] | None = None) -> Speed:
    """Median latency of both models at onnxruntime's default level, at batch 1 (or the model's
    fixed batch size) and at the evaluation batch size (its first run: see run_pieces, or
    ``first_run`` when the caller sizes it, as a language model's logits need), their runs
    interleaved so that load on the machine hits both alike. When the float weights pass
    INTERLEAVE_BYTES, one after the other and without onnxruntime's memory arena: two sessions
    would double the run's peak, and a DequantizeLinear model's arena keeps every layer's float
    weights per input shape (measured: 5 GB for a 0.3 GB 4-bit model of a 2.4 GB one)."""
    batch = run_pieces(dataset, dataset.batches[0])[0] if first_run is None else first_run
    fixed = set()
    for spec in model_inputs(float_model):
        axis = dataset.axes.get(spec.name, 0)
        size = spec.shape[axis] if spec.shape and axis is not None else None
        if size is not None:
            fixed.add(size)
    small = min(fixed, default=1)
    single = dataset.head(batch, small)
    feeds = (single, batch)
    models = [(float_model, "the float model", False), (quantized_model, "the quantized model", True)]
    lean = weights_bytes(float_model) > INTERLEAVE_BYTES
    if not lean:
        times = _interleaved([make_session(m, DEFAULT, what, built) for m, what, built in models], feeds)
    else:
        times = [t for m, what, built in models
                 for t in _interleaved([make_session(m, DEFAULT, what, built, lean=True)], feeds)]
    float_single, float_batch, quantized_single, quantized_batch = times
    return Speed(dataset.samples(batch), float_single, float_batch, quantized_single, quantized_batch,
                 small, lean)


def _interleaved(sessions: list[ort.InferenceSession], feeds: tuple[dict, dict]) -> list[float]:
    """Median milliseconds per session and feed, in that order, the runs interleaved."""
    times: dict[tuple[int, int], list[float]] = {(m, f): [] for m in range(len(sessions)) for f in range(2)}
    for session in sessions:
        for feed in feeds:
            session.run(None, feed)  # warm up: first runs allocate and prepack
    started = time.perf_counter()
    for _ in range(SPEED_REPEATS):
        for (m, f), samples in times.items():
            start = time.perf_counter()
            sessions[m].run(None, feeds[f])
            samples.append(1000 * (time.perf_counter() - start))
        if time.perf_counter() - started > SPEED_BUDGET:
            break
    return [float(np.median(samples)) for samples in times.values()]
