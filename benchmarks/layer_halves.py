"""What benchmarks/search_effort.py and benchmarks/damping.py share: a model's layers planned as a
default run plans them (per-layer grid, bias correction where a layer has a bias, ``mse`` scales),
without small layers at 8 bits, sequential calibration or damping, so each layer is measured alone
on the float model's inputs; calibrated on the whole calibration file or on its two halves; and a
rounding's problem on another half's statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from onnx_qubo.api import _dataset, _resolved, load_model, prepare
from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.progress import Progress
from onnx_qubo.core.types import InputStatistics
from onnx_qubo.layer import LayerTerms, LayerWork
from onnx_qubo.pipeline import Calibrated, calibrate
from onnx_qubo.plan import Plan, make_plan
from onnx_qubo.rounding.qubo import LayerProblem

QUIET = Progress()


def arguments(description: str | None) -> argparse.ArgumentParser:
    """MODEL CALIB --bits --block-size, the options both scripts take."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=32)
    return parser


def planned(args: argparse.Namespace, halves: bool, spread: bool = False) -> tuple[Plan, list[Calibrated]]:
    """The plan and the calibration on the whole file, or on its first and second halves
    (``spread``: with the samples' spread, for ``--damping auto``)."""
    model = prepare(load_model(args.model))
    config = _resolved(QuantizeConfig.from_flat(bits=args.bits, block_size=args.block_size, small_layers=0.0,
                                                sequential=False, damping=0.0), model)
    arrays = dict(np.load(args.calib))
    half = len(next(iter(arrays.values()))) // 2
    parts = ([{k: v[:half] for k, v in arrays.items()}, {k: v[half:] for k, v in arrays.items()}]
             if halves else [arrays])
    calibrated = [calibrate(model, _dataset(model, args.model, part, ".calib.npz", 64), QUIET, spread=spread)
                  for part in parts]
    return make_plan(config, calibrated[0].layers), calibrated


def held_out_problem(work: LayerWork, statistics: InputStatistics) -> LayerProblem:
    """``work``'s scales on other inputs' ``statistics`` (about their own means where a bias
    correction follows), undamped: the same rounding's output error there."""
    layer = work.plan.layer
    terms = LayerTerms(layer, statistics, work.plan.bias_is_variable, layer.weight, centered=work.plan.bias_correction)
    return terms.problem(work.plan.scheme, work.scales, work.bias_scales, work.plan.levels)
