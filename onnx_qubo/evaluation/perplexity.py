"""Language models: next-token perplexity of the float and the quantized model on token windows.

A model is a language model here when it has an integer ``input_ids`` input [batch, tokens] and
a floating-point output of rank 3 whose last axis is the vocabulary (the rows of the embedding
table ``input_ids`` indexes): the logits. Its evaluation streams: each onnxruntime run gets as
many windows as keep its logits under LOGITS_BYTES, and every measure is summed over chunks of
token rows in float64 (a numerically stable log-softmax per chunk), so the logits of all windows
(vocabulary x tokens) are never held at once. The label of position t in a window is the token
at t + 1 of the same window: a window of T tokens scores T - 1 predictions. The measures other
models get (top-1 agreement, relative output error, mean cosine, the optimization-level checks)
are computed over token rows, in the same passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort

from ..calibration.data import Dataset
from ..calibration.memory import return_freed_memory
from ..core.errors import DataError
from ..core.progress import Progress
from ..core.report import Evaluation
from ..graph.runtime import BASIC, DEFAULT, NONE, make_session, run_session
from ..graph.signature import model_inputs

IDS_INPUT = "input_ids"
LEVEL_WINDOWS = 4  # windows the optimization-level checks run (three sessions each: a whole pass would cost three)
LOGITS_BYTES = 64 << 20  # the most logits (float32) one onnxruntime run returns (the level checks hold 3)
CHUNK_VALUES = 1 << 22  # values per chunk of token rows the measures run over, in float64
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class LanguageModel:
    """Where a language model takes its tokens and gives its logits."""

    input_ids: str
    logits: str
    vocabulary: int
    context: int | None = None  # the most positions its rotary caches cover (None: not told by the graph)


def language_model(model: onnx.ModelProto) -> LanguageModel | None:
    """The model's tokens input and logits output (module docstring), or None when it has none:
    the output named ``logits`` when it qualifies, else the first that does. The last axis must
    be the vocabulary: as long as the embedding table ``input_ids`` indexes has rows, which tells
    logits from an encoder's hidden states [batch, tokens, width]."""
    ids = next((spec for spec in model_inputs(model) if spec.name == IDS_INPUT and spec.dtype.kind in "iu"
                and (spec.shape is None or len(spec.shape) == 2)), None)
    if ids is None:
        return None
    rows = _table_rows(model, ids.name)
    candidates = []
    for out in model.graph.output:
        tensor = out.type.tensor_type
        if tensor.elem_type in FLOAT_TYPES and tensor.HasField("shape") and len(tensor.shape.dim) == 3 \
                and tensor.shape.dim[2].dim_value > 1 and tensor.shape.dim[2].dim_value in rows:
            candidates.append(LanguageModel(ids.name, out.name, tensor.shape.dim[2].dim_value, _context(model)))
    return next((c for c in candidates if c.logits == "logits"), candidates[0] if candidates else None)


ROTARY_CACHES = {"GroupQueryAttention": 7, "RotaryEmbedding": 2}  # com.microsoft op -> its cos_cache input


def _context(model: onnx.ModelProto) -> int | None:
    """The positions a model can take: the rows of the cos caches its rotary embeddings read
    (``com.microsoft`` GroupQueryAttention and RotaryEmbedding, [positions, rotary width / 2]); a
    longer window would index past them (onnxruntime fails, or reads garbage)."""
    rows = {init.name: init.dims[0] for init in model.graph.initializer if len(init.dims) == 2}
    found = [rows[node.input[k]] for node in model.graph.node
             if node.domain == "com.microsoft" and (k := ROTARY_CACHES.get(node.op_type, -1)) >= 0
             and len(node.input) > k and node.input[k] in rows]
    return min(found) if found else None


def _table_rows(model: onnx.ModelProto, ids: str) -> set[int]:
    """Row counts of the constant tables that Gather nodes index with ``ids`` (or a Cast of it): an
    initializer, a Constant, or a Transpose of either (a tied LM head's [width, vocabulary] weight)."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    names, rows = {ids}, set()
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            shapes[node.output[0]] = list(node.attribute[0].t.dims)
        elif node.op_type == "Transpose" and node.input[0] in shapes:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            dims = shapes[node.input[0]]
            shapes[node.output[0]] = [dims[k] for k in perm] if perm else dims[::-1]
        elif node.op_type == "Cast" and node.input[0] in names:
            names.add(node.output[0])
        elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in names \
                and len(shapes.get(node.input[0], [])) == 2:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if axis == 0:
                rows.add(shapes[node.input[0]][0])
    return rows


def check_tokens(lm: LanguageModel, dataset: Dataset) -> None:
    """A DataError naming the data when a token id is outside the vocabulary (negative, or not
    below the logits' last axis: onnxruntime's Gather would fail or read past the table), or a
    window is longer than the model's context (its rotary caches' positions)."""
    for batch in dataset.batches:
        ids = batch.get(lm.input_ids)
        if ids is None or not ids.size:
            continue
        if lm.context is not None and ids.shape[-1] > lm.context:
            raise DataError(f"{dataset.origin}: input '{lm.input_ids}' holds windows of {ids.shape[-1]} tokens, longer "
                            f"than the model's context of {lm.context} positions (its rotary cos/sin caches); "
                            f"cut the text into windows of at most {lm.context} tokens")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= lm.vocabulary:
            bad = low if low < 0 else high
            raise DataError(f"{dataset.origin}: input '{lm.input_ids}' holds token id {bad}, outside the model's "
                            f"vocabulary of {lm.vocabulary} (the last axis of output '{lm.logits}')")


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed -log p(ids[b, t + 1] | logits[b, t]) over windows b and positions t < T - 1, and the
    number of predictions; float64, a chunk of rows at a time."""
    total, count = 0.0, 0
    for b, t0, t1 in _row_chunks(logits):
        stop = min(t1, ids.shape[1] - 1)
        if stop <= t0:
            continue
        z = logits[b, t0:stop].astype(np.float64)
        total += float((_log_sum_exp(z) - z[np.arange(len(z)), ids[b, t0 + 1:stop + 1]]).sum())
        count += stop - t0
    return total, count


def _log_sum_exp(z: np.ndarray) -> np.ndarray:
    """log(sum(exp(z))) per row, shifted by the row's maximum so that nothing overflows."""
    top = z.max(axis=1)
    return top + np.log(np.exp(z - top[:, None]).sum(axis=1))


def _row_chunks(logits: np.ndarray) -> list[tuple[int, int, int]]:
    """(window, first position, end position) runs of about CHUNK_VALUES values of ``logits``."""
    windows, positions, vocabulary = logits.shape
    rows = max(1, CHUNK_VALUES // max(vocabulary, 1))
    return [(b, t, min(positions, t + rows)) for b in range(windows) for t in range(0, positions, rows)]


@dataclass
class _Pair:
    """Sums comparing outputs ``y`` against a reference ``r`` row by row (a token's logits)."""

    rows: int = 0
    same_top1: int = 0
    error2: float = 0.0
    reference2: float = 0.0
    cosines: float = 0.0
    max_abs: float = 0.0

    def add(self, y: np.ndarray, r: np.ndarray) -> None:
        self.rows += len(y)
        self.same_top1 += int((y.argmax(axis=1) == r.argmax(axis=1)).sum())
        self.error2 += float(np.sum((y - r) ** 2))
        self.reference2 += float(np.sum(r ** 2))
        norms = np.linalg.norm(y, axis=1) * np.linalg.norm(r, axis=1)
        self.cosines += float((np.einsum("ij,ij->i", y, r) / np.maximum(norms, 1e-30)).sum())
        self.max_abs = max(self.max_abs, float(np.abs(y - r).max(initial=0.0)))

    @property
    def relative(self) -> float:
        return float(math.sqrt(self.error2) / max(math.sqrt(self.reference2), 1e-30))


@dataclass
class _Scores:
    """Negative log-likelihood summed per model, and the predictions scored."""

    nll: list[float] = field(default_factory=list)
    predictions: int = 0

    def perplexity(self, model: int) -> float:
        return math.exp(self.nll[model] / max(self.predictions, 1))


def stream(sessions: list[tuple[ort.InferenceSession, str, bool]], lm: LanguageModel, dataset: Dataset,
           progress: Progress, label: str, pairs: list[tuple[int, int]], scored: bool = True
           ) -> tuple[_Scores, list[_Pair]]:
    """Run every window through each (session, what, built) and sum (``scored``) each one's
    next-token NLL and, for each (model, reference) in ``pairs``, the comparison measures; a few
    windows per run."""
    scores, compared = _Scores(nll=[0.0] * len(sessions)), [_Pair() for _ in pairs]
    with progress.bar(dataset.num_samples, label) as bar:
        for batch in dataset.batches:
            for piece in _pieces(dataset, batch, lm):
                ids = piece[lm.input_ids]
                outputs = [run_session(session, [lm.logits], piece, what, dataset.origin, built)[0]
                           for session, what, built in sessions]
                if scored:
                    for k, logits in enumerate(outputs):
                        total, count = next_token_nll(logits, ids)
                        scores.nll[k] += total
                    scores.predictions += count
                for b, t0, t1 in _row_chunks(outputs[0]):
                    rows = [logits[b, t0:t1].astype(np.float64) for logits in outputs]
                    for (model, reference), pair in zip(pairs, compared):
                        pair.add(rows[model], rows[reference])
                del outputs
                bar.update(dataset.samples(piece))
    return scores, compared


def _pieces(dataset: Dataset, batch: dict[str, np.ndarray], lm: LanguageModel) -> list[dict[str, np.ndarray]]:
    """``batch`` in runs whose logits (float32) stay under LOGITS_BYTES, at least one window each."""
    count = dataset.samples(batch)
    tokens = batch[lm.input_ids].shape[-1] if batch[lm.input_ids].ndim else 1
    size = max(1, LOGITS_BYTES // max(4 * tokens * lm.vocabulary, 1))
    if not dataset.splittable or count <= size:
        return [batch]
    return [dataset.piece(batch, start, min(count, start + size)) for start in range(0, count, size)]


def _first_windows(dataset: Dataset, count: int) -> Dataset:
    """The first ``count`` windows of ``dataset`` (whole batches where it may not be split)."""
    batches, left = [], count
    for batch in dataset.batches:
        if left <= 0:
            break
        size = dataset.samples(batch)
        batches.append(batch if size <= left or not dataset.splittable else dataset.piece(batch, 0, left))
        left -= size
    return replace(dataset, batches=batches, labels=None)


def first_run(lm: LanguageModel, dataset: Dataset) -> dict[str, np.ndarray]:
    """The first run of the evaluation's windows, sized by its logits: the batch the speed check times."""
    return _pieces(dataset, dataset.batches[0], lm)[0]


def evaluate_language_model(lm: LanguageModel, float_model: onnx.ModelProto, quantized_model: onnx.ModelProto,
                            dataset: Dataset, progress: Progress, check_levels: bool = True,
                            portable: onnx.ModelProto | None = None) -> Evaluation:
    """Perplexity of both models on ``dataset``'s windows and the comparison measures over token
    rows, streamed (module docstring): the float and the quantized model in one pass, then
    (``check_levels``) the quantized model at the default and basic level against ``portable``
    (default: the quantized model) with optimizations disabled, on the first LEVEL_WINDOWS windows
    (the kernels' agreement with the reference does not need the whole text)."""
    check_tokens(lm, dataset)
    sessions = [(make_session(float_model, DEFAULT, "the float model", False, lean=True), "the float model", False),
                (make_session(quantized_model, DEFAULT, "the quantized model", True, lean=True),
                 "the quantized model", True)]
    scores, (quantized,) = stream(sessions, lm, dataset, progress, "perplexity", [(1, 0)])
    del sessions
    return_freed_memory()
    default_vs_plain = basic_vs_plain = default_vs_basic = 0.0
    matches, checked = True, dataset
    if check_levels:
        plain = quantized_model if portable is None else portable
        levels = [(make_session(quantized_model, DEFAULT, "the quantized model", True, lean=True),
                   "the quantized model", True),
                  (make_session(quantized_model, BASIC, "the quantized model (basic)", True, lean=True),
                   "the quantized model (basic)", True),
                  (make_session(plain, NONE, "the portable model", True, lean=True),
                   "the portable model (no optimization)", True)]
        checked = _first_windows(dataset, LEVEL_WINDOWS)
        _, (default_plain, basic_plain, default_basic) = stream(levels, lm, checked, progress, "optimization levels",
                                                                [(0, 2), (1, 2), (0, 1)], scored=False)
        default_vs_plain, basic_vs_plain = default_plain.relative, basic_plain.relative
        default_vs_basic, matches = default_basic.max_abs, default_basic.same_top1 == default_basic.rows
    return Evaluation(
        data=dataset.origin, output=lm.logits, samples=dataset.num_samples, float_accuracy=None,
        quantized_accuracy=None, top1_agreement=quantized.same_top1 / max(quantized.rows, 1),
        relative_output_error=quantized.relative, default_matches_basic=matches,
        default_vs_basic_max_diff=default_vs_basic, mean_cosine=quantized.cosines / max(quantized.rows, 1),
        max_abs_error=quantized.max_abs, decision_flips=None, default_vs_unoptimized=default_vs_plain,
        basic_vs_unoptimized=basic_vs_plain, float_perplexity=scores.perplexity(0),
        quantized_perplexity=scores.perplexity(1), predictions=scores.predictions,
        level_samples=checked.num_samples if checked.num_samples < dataset.num_samples else None)
