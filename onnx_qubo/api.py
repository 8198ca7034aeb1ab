"""``quantize(...)`` and ``compare(...)``: each job in one call, for Python pipelines. The CLI is a
thin layer on them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx

from .compare import Comparison
from .compare import compare as run_comparison
from .data import load_dataset
from .errors import QuboInputError
from .files import dump_directory, inputs_read, load_model, writable_path, write_atomically
from .pipeline import QuantizeOptions, calibrate, quantize_model
from .progress import Progress
from .report import Report
from .scales import SCALE_METHODS
from .solvers import SOLVERS, Solver
from .validate import check_bits
from .verify import evaluate, reference_scores

CALIB_SUFFIX, EVAL_SUFFIX = ".calib.npz", ".eval.npz"


def quantize(model: str | os.PathLike | onnx.ModelProto, output_path: str | os.PathLike, *,
             bits: int = 2, calibration: Any = None, evaluation: Any = None, scale: str = "mse",
             solver: str | Solver = "fast", seed: int = 0, batch_size: int = 256,
             report_path: str | os.PathLike | None = None, dump_qubo: str | os.PathLike | None = None,
             load_solution: str | os.PathLike | None = None, exclude: Sequence[str] = (),
             layer_bits: Mapping[str, int] | None = None, bias_correction: bool = False,
             granularity: str = "channel", block_size: int = 0, symmetric: bool = True, bias: str = "float",
             activations: str = "none", activation_range: str = "minmax", sequential: bool = False,
             progress: bool = False) -> Report:
    """Quantize the dense layers of ``model`` to ``bits`` and write the result to ``output_path``.

    ``solver``: a name from ``SOLVERS`` or any object with the ``Solver`` interface.

    ``calibration`` / ``evaluation``: an .npz path (arrays keyed by input name, optional
    ``labels``), a dict of arrays, or an onnxruntime ``CalibrationDataReader``. When the model
    is a path, ``<stem>.calib.npz`` and ``<stem>.eval.npz`` beside it are used if not given;
    without evaluation data the calibration data is evaluated. Returns the report (also
    written as JSON to ``report_path`` when given). ``dump_qubo``: a directory to write each
    layer's QUBOs to; ``load_solution``: a directory of roundings to use instead of solving
    (format in ``onnx_qubo.exchange``). ``exclude``: layer names to leave in float;
    ``layer_bits``: {layer name: bits} overriding ``bits`` (names as ``onnx-qubo inspect``
    lists them). ``bias_correction``: add to each layer's output the mean error its rounding
    leaves on the calibration data. The scheme: ``granularity`` ("channel", "tensor" or
    "block" with ``block_size`` inputs per scale), ``symmetric`` (False: unsigned grids with
    zero points), ``bias`` ("float", "quantize": a QUBO variable at the weights' bit width,
    "int32": input scale x weight scale, needs quantized activations), ``activations``
    ("none", "int8", "uint8": per-tensor QDQ on each layer's input, ranges by
    ``activation_range`` "minmax" or "percentile"), ``sequential`` (calibrate each layer on
    the outputs of the already quantized earlier layers). Raises ``QuboInputError`` on bad input,
    before any output is written; the input model is never modified.
    """
    started = time.perf_counter()
    layer_bits = dict(layer_bits or {})
    for b in [bits, *layer_bits.values()]:
        _check_bits(b)
    _check_scale(scale)
    solver = _solver(solver)
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    reads = inputs_read(model, calibration, evaluation)
    output_path = writable_path(output_path, reads=reads, what="output")
    if report_path is not None:
        report_path = writable_path(report_path, reads=reads, what="report")
        if report_path.resolve() == output_path.resolve():
            raise QuboInputError(f"report '{report_path}' is the output model's path; choose another")
    if dump_qubo is not None:
        dump_directory(dump_qubo, reads=reads)
    if load_solution is not None and not Path(load_solution).is_dir():
        raise QuboInputError(f"--load-solution '{load_solution}' is not a directory")
    options = QuantizeOptions(bits=bits, scale=scale, solver=solver, seed=seed,
                              dump_dir=None if dump_qubo is None else Path(dump_qubo),
                              solution_dir=None if load_solution is None else Path(load_solution),
                              layer_bits=layer_bits, bias_correction=bias_correction, granularity=granularity,
                              block_size=block_size, symmetric=symmetric, bias=bias, activations=activations,
                              activation_range=activation_range, sequential=sequential)
    options.check()
    float_model, calib_data, eval_data = _load_inputs(model, input_path, calibration, evaluation, batch_size)
    bar = Progress(enabled=progress)
    quantized, layers, skipped = quantize_model(float_model, calib_data, options, bar, exclude)
    data = quantized.SerializeToString()
    evaluation = evaluate(reference_scores(float_model, eval_data, bar), quantized, bar)  # before any output
    write_atomically(output_path, data)

    report = Report(
        input_path=None if input_path is None else str(input_path), output_path=str(output_path),
        bits=bits, scale=scale, solver="loaded" if load_solution else solver.name, calibration=calib_data.origin,
        calibration_samples=calib_data.num_samples, layers=layers, skipped=skipped,
        evaluation=evaluation,
        input_bytes=float_model.ByteSize(), output_bytes=len(data),
        seconds=time.perf_counter() - started, scheme=options.describe())
    if report_path is not None:
        write_atomically(report_path, report.to_json().encode(), "report")
    return report


def compare(model: str | os.PathLike | onnx.ModelProto, *, calibration: Any = None,
            evaluation: Any = None, bits: Sequence[int] = (8, 4, 3, 2, 1),
            scales: Sequence[str] = ("minmax", "mse"), solvers: Sequence[str | Solver] = ("rtn", "fast"),
            samples: int = 0, seed: int = 0, batch_size: int = 256, granularity: str = "channel",
            block_size: int = 0, symmetric: bool = True, bias: str = "float", activations: str = "none",
            activation_range: str = "minmax", sequential: bool = False, progress: bool = False) -> Comparison:
    """Quantize ``model`` for every bit width x scale x solver and evaluate each in onnxruntime
    (nothing is written). ``samples`` > 0 adds the cost-accuracy study: that many random
    roundings around the best QUBO solution per bit width. Data and scheme as for ``quantize``."""
    for b in bits:
        _check_bits(b)
    for scale in scales:
        _check_scale(scale)
    chosen = [_solver(s) for s in solvers]
    if samples < 0:
        raise QuboInputError(f"samples must be 0 or more, got {samples}")
    scheme = QuantizeOptions(bits=min(bits, default=8), granularity=granularity, block_size=block_size,
                             symmetric=symmetric, bias=bias, activations=activations,
                             activation_range=activation_range, sequential=sequential)
    scheme.check()
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    float_model, calib_data, eval_data = _load_inputs(model, input_path, calibration, evaluation, batch_size)
    bar = Progress(enabled=progress)
    calibrated = calibrate(float_model, calib_data, bar, activations=activations, activation_range=activation_range)
    reference = reference_scores(float_model, eval_data, bar)
    name = input_path.name if input_path else float_model.graph.name
    return run_comparison(calibrated, reference, list(bits), list(scales), chosen, samples, seed, bar, name, scheme)


def _check_bits(bits: int) -> None:
    check_bits(bits)


def _check_scale(scale: str) -> None:
    if scale not in SCALE_METHODS:
        raise QuboInputError(f"scale must be one of {', '.join(SCALE_METHODS)}, got '{scale}'")


def _solver(solver: str | Solver) -> Solver:
    if not isinstance(solver, str):
        return solver
    if solver not in SOLVERS:
        raise QuboInputError(f"solver must be one of {', '.join(SOLVERS)}, got '{solver}'")
    return SOLVERS[solver]()


def _load_inputs(model, input_path: Path | None, calibration, evaluation, batch_size):
    """The float model, calibration data, and evaluation data (the calibration data if none)."""
    float_model = model if input_path is None else load_model(input_path)
    calibration = _beside(input_path, CALIB_SUFFIX) if calibration is None else calibration
    if calibration is None:
        where = f" or put '{input_path.stem}{CALIB_SUFFIX}' beside the model" if input_path else ""
        raise QuboInputError("no calibration data: pass --calib FILE.npz (arrays keyed by the "
                             f"model's input names){where}")
    calib_data = load_dataset(calibration, float_model, batch_size)
    evaluation = _beside(input_path, EVAL_SUFFIX) if evaluation is None else evaluation
    eval_data = calib_data if evaluation is None else load_dataset(evaluation, float_model, batch_size)
    return float_model, calib_data, eval_data


def _beside(model_path: Path | None, suffix: str) -> Path | None:
    """``<dir>/<stem><suffix>`` when the model is a file and that file exists."""
    if model_path is None:
        return None
    candidate = model_path.with_name(model_path.stem + suffix)
    return candidate if candidate.is_file() else None
