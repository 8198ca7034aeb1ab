"""Each form gives its layers an input view (types.InputView), and the stages ask the view, never
the kind: its key, the problems the layer splits into, its accumulator and the vectors it takes
(a dense layer's last axis, a grouped Conv's patches per group, an LSTM's gate inputs per
direction) give the Gram, cross and drift means numpy computes from those vectors; and the
stages' modules name no kind (a Conv's geometry, a recurrent cell, a view class)."""

import ast
from pathlib import Path

import numpy as np
import pytest
from test_conv import conv_model
from test_recurrent import BATCH, HIDDEN, INPUT, STEPS, recurrent_model

from onnx_qubo.calibration.patches import patches
from onnx_qubo.forms.base import LastAxis
from onnx_qubo.forms.conv import Patches
from onnx_qubo.forms.recurrent import GateInputs
from onnx_qubo.model.groups import split_groups
from onnx_qubo.pipeline import find_layers

from graphs import mlp_model

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_qubo"
STAGES = ["calibration/statistics.py", "calibration/memory.py", "model/groups.py", "pipeline.py", "plan.py",
          "layer.py", "model/lowering.py", "model/discovery.py"]
KIND_NAMES = {"geometry", "cell", "ConvGeometry", "RecurrentCell", "LastAxis", "Patches", "GateInputs",
              "output_name", "patches", "grams", "ConvGram", "RecurrentGram"}
RNG = np.random.default_rng(0)


def dense():
    """A model, and two batches of its first layer's input (and of the tensors its view reads)."""
    x = RNG.standard_normal((7, 6))
    return mlp_model(widths=(6, 5, 4)), [{"x": x[:3]}, {"x": x[3:]}]


def grouped_conv():
    x = RNG.standard_normal((3, 4, 9, 8))
    return conv_model(channels=(4, 8), group=4, pads=[1, 1, 1, 1]), [{"x": x[:1]}, {"x": x[1:]}]


def lstm():
    """Batches split on the batch axis: X [T, B, I], Y [T, D, B, H] (layout 0)."""
    x, y = RNG.standard_normal((STEPS, BATCH, INPUT)), RNG.standard_normal((STEPS, 2, BATCH, HIDDEN))
    half = BATCH // 2
    return recurrent_model(direction="bidirectional"), [{"xt": x[:, :half], "y": y[:, :, :half]},
                                                        {"xt": x[:, half:], "y": y[:, :, half:]}]


def rows_of(view, x: np.ndarray, tensors: dict[str, np.ndarray], f: int) -> list[np.ndarray]:
    """The vectors of each problem, computed here from the kind (what the stages must not do)."""
    if isinstance(view, Patches):
        return list(patches(x, view.geometry))
    if isinstance(view, GateInputs):
        return list(view.cell.gate_inputs(x, tensors))
    return [x.reshape(-1, f)]


@pytest.mark.parametrize("case, kind, problems, key", [
    (dense, LastAxis, 1, "{input}"), (grouped_conv, Patches, 4, "{input}#patches:{owner}"),
    (lstm, GateInputs, 2, "{input}#gates:{owner}")])
def test_each_form_gives_its_view_and_the_view_splits_keys_and_sums(case, kind, problems, key):
    model, batches = case()
    found, _ = find_layers(model)
    layer = found[0]
    assert isinstance(layer.view, kind) and layer.view.problems == problems
    assert layer.source_key == key.format(input=layer.input_name, owner=layer.name)
    parts = split_groups([layer])
    assert len(parts) == problems and all(p.owner == layer.name and p.view is layer.view for p in parts)
    if problems > 1:
        assert [p.statistics_key for p in parts] == [f"{layer.source_key}[{g}]" for g in range(problems)]
    f, name = layer.shape[1], layer.input_name
    seen = {id(batch): batch[name] + 0.1 * RNG.standard_normal(batch[name].shape) for batch in batches}
    sums = layer.view.accumulator(f, True, layer.owner)
    for batch in batches:  # what a quantized layer would see: its input changed a little
        sums.update(layer.view.vectors(batch[name], batch), layer.view.vectors(seen[id(batch)], batch))
    for g in range(problems):
        floats = np.vstack([rows_of(layer.view, batch[name], batch, f)[g] for batch in batches])
        seen_rows = np.vstack([rows_of(layer.view, seen[id(batch)], batch, f)[g] for batch in batches])
        z = np.hstack([seen_rows, np.ones((len(seen_rows), 1))])
        d = floats - seen_rows
        stats = sums.statistics(g)
        assert stats.count == len(z)
        np.testing.assert_allclose(stats.gram, z.T @ z / len(z), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.cross, z.T @ d / len(z), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.drift, d.T @ d / len(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", STAGES)
def test_the_stages_name_no_layer_kind(module):
    tree = ast.parse((PACKAGE / module).read_text())
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {alias.name.rpartition(".")[2] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
              for alias in node.names}
    names |= {(node.module or "").rpartition(".")[2] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names & KIND_NAMES == set()
