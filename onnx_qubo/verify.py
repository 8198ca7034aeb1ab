"""Run the float and the quantized model in onnxruntime on the same data and compare them."""

from __future__ import annotations

import numpy as np
import onnx

from .data import Dataset
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


def evaluate(float_model: onnx.ModelProto, quantized_model: onnx.ModelProto, dataset: Dataset,
             progress: Progress) -> Evaluation:
    """Accuracy (with labels), top-1 agreement and output error of the quantized model, run
    with onnxruntime's default session options, plus a check that its basic level agrees."""
    sessions = [make_session(float_model, DEFAULT, "the float model"),
                make_session(quantized_model, DEFAULT, "the quantized model"),
                make_session(quantized_model, BASIC, "the quantized model")]
    name = scores_output(float_model)
    outputs: list[list[np.ndarray]] = [[], [], []]
    with progress.bar(len(dataset.batches), "evaluating") as bar:
        for batch in dataset.batches:
            for session, collected in zip(sessions, outputs):
                collected.append(session.run([name], batch)[0])
            bar.update(1)
    y_float, y_quant, y_basic = (np.concatenate(o).astype(np.float64) for o in outputs)

    pred_float, pred_quant = y_float.argmax(axis=-1), y_quant.argmax(axis=-1)
    labels = dataset.labels
    has_labels = labels is not None and pred_float.shape == labels.shape
    return Evaluation(
        data=dataset.origin,
        output=name,
        samples=len(y_float),
        float_accuracy=float((pred_float == labels).mean()) if has_labels else None,
        quantized_accuracy=float((pred_quant == labels).mean()) if has_labels else None,
        top1_agreement=float((pred_float == pred_quant).mean()),
        relative_output_error=float(np.linalg.norm(y_quant - y_float) / max(np.linalg.norm(y_float), 1e-30)),
        default_matches_basic=bool((y_basic.argmax(axis=-1) == pred_quant).all()),
        default_vs_basic_max_diff=float(np.abs(y_basic - y_quant).max()),
    )
