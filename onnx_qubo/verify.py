"""Run the float and the quantized model in onnxruntime on the same data and compare them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .data import Dataset
from .errors import ModelError
from .progress import Progress
from .report import Evaluation
from .runtime import BASIC, DEFAULT, make_session

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
    """The float model's scores on the evaluation data, computed once per run."""

    dataset: Dataset
    output: str
    scores: np.ndarray  # float64, first axis = samples

    @property
    def has_labels(self) -> bool:
        """Whether the data's labels give one class per prediction (argmax of the scores)."""
        labels = self.dataset.labels
        return labels is not None and labels.shape == self.scores.shape[:-1]


def reference_scores(float_model: onnx.ModelProto, dataset: Dataset, progress: Progress) -> Reference:
    name = scores_output(float_model)
    return Reference(dataset, name, run_scores(float_model, DEFAULT, dataset, name, progress, "float model"))


def run_scores(model, level, dataset: Dataset, name: str, progress: Progress, what: str) -> np.ndarray:
    session = make_session(model, level, f"the {what}")
    with progress.bar(len(dataset.batches), f"running the {what}") as bar:
        outputs = []
        for batch in dataset.batches:
            outputs.append(session.run([name], batch)[0])
            samples = len(next(iter(batch.values())))
            if len(dataset.batches) > 1 and outputs[-1].shape[:1] != (samples,):
                raise ModelError(f"output '{name}' of the {what} has shape {outputs[-1].shape} for a batch of "
                                 f"{samples} samples: its first axis is not the batch, so batches cannot be "
                                 "joined; evaluate all samples in one batch (batch_size)")
            bar.update(1)
    return np.concatenate(outputs).astype(np.float64)


def evaluate(reference: Reference, quantized_model: onnx.ModelProto, progress: Progress,
             check_basic: bool = True) -> Evaluation:
    """Accuracy (with labels), top-1 agreement and output error of the quantized model, run
    with onnxruntime's default session options, plus (``check_basic``) whether its basic
    optimization level gives the same predictions."""
    data, name = reference.dataset, reference.output
    y_float = reference.scores
    y_quant = run_scores(quantized_model, DEFAULT, data, name, progress, "quantized model")
    y_basic = run_scores(quantized_model, BASIC, data, name, progress, "quantized model (basic)") \
        if check_basic else y_quant
    pred_float, pred_quant = y_float.argmax(axis=-1), y_quant.argmax(axis=-1)
    labels, has_labels = data.labels, reference.has_labels
    return Evaluation(
        data=data.origin,
        output=name,
        samples=len(y_float),
        float_accuracy=float((pred_float == labels).mean()) if has_labels else None,
        quantized_accuracy=float((pred_quant == labels).mean()) if has_labels else None,
        top1_agreement=float((pred_float == pred_quant).mean()),
        relative_output_error=float(np.linalg.norm(y_quant - y_float) / max(np.linalg.norm(y_float), 1e-30)),
        default_matches_basic=bool((y_basic.argmax(axis=-1) == pred_quant).all()),
        default_vs_basic_max_diff=float(np.abs(y_basic - y_quant).max()),
    )
