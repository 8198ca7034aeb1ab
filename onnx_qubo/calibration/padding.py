"""Padded positions: which input marks them, and what share of the data they are.

Sequence models are calibrated on batches padded to one length, and a tokenizer says which
positions are padding in ``attention_mask`` ([batch, sequence], 0 at a pad; TensorFlow's BERT:
``input_mask``). A model that takes the mask never lets those positions reach its output
(attention ignores them as keys; pooling and losses skip them), yet their hidden states run
through every layer: counted in a layer's Gram matrix they make it fit the rounding to inputs
that do not matter (half of the rows of a sentence-embedding model calibrated on sentences padded
to 32 tokens). ``--padding-mask`` names the input whose zeros mark them; the layers whose inputs
are per position (statistics.py: a last-axis view whose leading axes are the mask's) leave them
out, and an output that is per position is measured on the kept ones (evaluation/verify.py).
Measured on all-MiniLM-L6-v2 (docs/results.md, "Padded positions"): the output error 4-7% lower
at 2-4 bits.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from ..core.errors import OptionError
from ..core.options import AUTO
from ..graph.signature import model_inputs
from .data import Dataset

# what --padding-mask auto looks for: the tokenizers' name (Hugging Face exports), and TensorFlow BERT's
# as tf2onnx writes it (the ONNX model zoo's BERT-SQuAD: "input_mask:0")
MASK_INPUTS = ("attention_mask", "input_mask", "attention_mask:0", "input_mask:0")
NONE = "none"


def with_padding_mask(dataset: Dataset, model: onnx.ModelProto, option: str = AUTO,
                      what: str = "calibration data") -> Dataset:
    """``dataset`` (``what``: which, for errors) with its ``padding_mask`` set from ``option``: an
    input's name, ``none``, or ``auto`` (the first of MASK_INPUTS the model takes as [batch,
    sequence] where the data pads)."""
    if option == NONE:
        return replace(dataset, padding_mask=None)
    inputs = {spec.name for spec in model_inputs(model)}
    if option == AUTO:
        found = [name for name in MASK_INPUTS if name in inputs and _mask_problem(dataset, name, what) is None
                 and padded_share(dataset, name) > 0]
        return replace(dataset, padding_mask=found[0] if found else None)
    if option not in inputs:
        raise OptionError(f"{{padding_mask}} '{option}' is not an input of the model (its inputs: "
                          f"{', '.join(sorted(inputs))}); give an input, auto or none", "padding_mask")
    problem = _mask_problem(dataset, option, what)
    if problem is not None:
        raise OptionError(f"{{padding_mask}} '{option}' {problem}", "padding_mask")
    return replace(dataset, padding_mask=option)


def _mask_problem(dataset: Dataset, name: str, what: str) -> str | None:
    """Why input ``name`` of ``dataset`` (``what``) cannot mark padded positions, or None: it must
    be fed per sample (batch axis 0), as [batch, sequence] integers or booleans."""
    for batch in dataset.batches:
        mask = batch.get(name)
        if mask is None:
            return f"is not in the {what}"
        if dataset.axes.get(name, 0) != 0 or mask.ndim != 2:
            return f"is not a [batch, sequence] mask: its array in the {what} has shape {list(mask.shape)}"
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            return f"is not an integer or boolean mask: its array in the {what} holds {mask.dtype}"
    return None


def padded_share(dataset: Dataset, name: str) -> float:
    """The share of the calibration positions that input ``name`` marks as padding (zeros)."""
    masks = [batch[name] for batch in dataset.batches]
    total = sum(mask.size for mask in masks)
    return sum(int(np.count_nonzero(mask == 0)) for mask in masks) / max(total, 1)


def padding_note(dataset: Dataset) -> list[str]:
    """What the report says about padded positions: their share, and how to count them anyway."""
    if dataset.padding_mask is None:
        return []
    share = padded_share(dataset, dataset.padding_mask)
    return [f"padded positions ({dataset.padding_mask} = 0: {share:.0%} of the calibration positions) left out of "
            "the statistics of the layers whose inputs are per position (--padding-mask none counts them)"]
