"""``quantize(...)`` and ``compare(...)``: each job in one call, for Python pipelines. The CLI is a
thin layer on them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx

from . import workers as distributed
from .autoscheme import quantize_auto
from .choice import parse_choice
from .compare import Comparison
from .compare import compare as run_comparison
from .contribution import Sensitivity, measure
from .data import Dataset, load_dataset
from .errors import OptionError, OutputError
from .files import Outputs, dump_directory, external_data_path, genai_folder, inputs_read, load_model, writable_path
from .options import QuantizeOptions, ScaleMethod, check_bits, check_integer, solver_for
from .passes import online_rotations
from .perplexity import check_tokens, evaluate_language_model, first_run, language_model
from .pipeline import calibrate, prepare, quantize_model
from .plan import make_plan
from .progress import Progress
from .report import Report
from .rotation import describe as describe_rotation
from .rotation import parse_rotation
from .rotation import rotate as rotate_inputs
from .solvers import Solver
from .verify import evaluate, measure_speed, reference_scores

CALIB_SUFFIX, EVAL_SUFFIX = ".calib.npz", ".eval.npz"


@distributed.closing_ray  # a Ray cluster the run starts ends with it, on every exit path
def quantize(model: str | os.PathLike | onnx.ModelProto, output_path: str | os.PathLike, *,
             bits: int = 2, calibration: Any = None, evaluation: Any = None, scale: str = "mse",
             solver: str | Solver = "fast", seed: int = 0, batch_size: int = 256,
             report_path: str | os.PathLike | None = None, dump_qubo: str | os.PathLike | None = None,
             load_solution: str | os.PathLike | None = None, exclude: Sequence[str] = (),
             layer_bits: Mapping[str, int] | None = None, bias_correction: bool = False,
             granularity: str = "channel", block_size: int = 0, symmetric: bool = True, bias: str = "float",
             activations: str = "none", activation_range: str = "minmax", sequential: bool = False,
             format: str = "qdq", ort_accuracy_level: int = 0, lower_bound: bool = False, workers: int = 1,
             ray_address: str | None = None, external_data: bool = False, max_memory: float | None = None,
             speed: bool = True, progress: bool = False, embeddings: bool = False, auto_scheme: bool = False,
             size_budget: float | None = None, max_error: float | None = None,
             rotate: str = "none", rotate_block: int = 64) -> Report:  # rotation: issue 19
    """Quantize the dense layers of ``model`` to ``bits`` and write the result to ``output_path``.

    ``solver``: a name from ``SOLVERS`` or any object with the ``Solver`` interface.

    ``calibration`` / ``evaluation``: an .npz path (arrays keyed by input name, optional
    ``labels``), a dict of arrays, or an onnxruntime ``CalibrationDataReader``. When the model
    is a path, ``<stem>.calib.npz`` and ``<stem>.eval.npz`` beside it are used if not given;
    without evaluation data the calibration data is evaluated. Returns the report (also
    written as JSON to ``report_path`` when given); a language model (an ``input_ids`` input and
    rank-3 logits, perplexity.py) is evaluated by next-token perplexity, streamed. ``dump_qubo``:
    a directory to write each layer's QUBOs to; ``load_solution``: a directory of roundings to use instead of solving
    (format in ``onnx_qubo.exchange``). ``exclude``: layer names to leave in float;
    ``layer_bits``: {layer name: bits} overriding ``bits`` (names as ``onnx-qubo inspect``
    lists them). ``bias_correction``: add to each layer's output the mean error its rounding
    leaves on the calibration data. The scheme: ``granularity`` ("channel", "tensor" or
    "block" with ``block_size`` inputs per scale), ``symmetric`` (False: unsigned grids with
    zero points), ``bias`` ("float", "quantize": a QUBO variable at the weights' bit width,
    "int32": input scale x weight scale, needs quantized activations), ``activations``
    ("none", "int8", "uint8": per-tensor QDQ on each layer's input, ranges by
    ``activation_range`` "minmax" or "percentile"), ``sequential`` (calibrate each layer on
    the outputs of the already quantized earlier layers). ``format``: "qdq" (standard ONNX,
    DequantizeLinear) or "ort" (onnxruntime's fast kernels from the same codes: MatMulNBits,
    MatMulIntegerToFloat, and with quantized ``activations`` QLinearConv for a Conv, whose output
    it rounds to 8 bits over a range calibrated for it; a layer they cannot run correctly or
    faster keeps the portable form, and the report says why); ``ort_accuracy_level`` 4 lets
    MatMulNBits quantize activations to int8 inside the kernel (faster, at the output error the
    report states). ``lower_bound``: certify a lower bound on each layer's optimal cost (costs
    about as much as a solve). ``workers``: solve each layer's rows on that many local processes;
    ``ray_address``: on a Ray cluster ("local" starts one here; needs ``pip install
    'onnx-qubo[ray]'``): the same bits either way.
    ``external_data``: write the tensors to ``<output>.data`` beside the model (always done when
    the model would pass protobuf's 2 GB limit). ``max_memory``: GB the run may hold (default 60% of
    the machine's memory): the model's weights, the layer statistics of one calibration pass and
    one layer's solve; statistics that do not fit are gathered in several passes. ``speed``:
    time the float and the quantized model (batch 1 and one evaluation batch) for the report.
    ``embeddings``: also quantize the constant tables that ``Gather`` nodes read rows of (word
    embeddings), at ``bits`` with a scale per row (or per block), by least squared error per row
    (forms/gather.py; with ``format`` "ort" as GatherBlockQuantized where it fits).
    Automatic per-layer choices, from each layer's model-output error measured alone on the
    calibration data (autoscheme.py; costs one solve per scheme tried and one onnxruntime run of
    the calibration data per layer and scheme): ``auto_scheme`` tries per channel and blocks of
    32, symmetric and asymmetric, per layer; ``size_budget`` (MB, the whole model) keeps the
    layers that damage the output most per byte at 8 bits or float while the model fits;
    ``max_error`` does so until the estimated relative output error is reached.
    ``rotate`` "hadamard": rotate each layer's input space first (random signs from ``seed``, then
    a Hadamard transform per block of at most ``rotate_block`` inputs; rotation.py), the float
    model still the reference.
    Raises a ``QuboInputError`` (errors.py: ``ModelError``, ``DataError``, ``OptionError``,
    ``OutputError``) on bad input, before any output is written; the input model is never modified.
    """
    started = time.perf_counter()
    options = QuantizeOptions.parse(
        bits=bits, scale=scale, solver=solver, seed=seed, granularity=granularity, block_size=block_size,
        symmetric=symmetric, bias=bias, activations=activations, activation_range=activation_range,
        sequential=sequential, bias_correction=bias_correction, layer_bits=dict(layer_bits or {}),
        exclude=tuple(exclude), dump_dir=None if dump_qubo is None else Path(dump_qubo),
        solution_dir=None if load_solution is None else Path(load_solution), format=format,
        ort_accuracy_level=ort_accuracy_level, lower_bound=lower_bound, workers=workers, ray_address=ray_address,
        max_memory=max_memory, embeddings=embeddings, auto_scheme=auto_scheme, size_budget=size_budget,
        max_error=max_error)
    rotation, rotation_block = parse_rotation(rotate, rotate_block)
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    reads = inputs_read(model, calibration, evaluation, load_solution)  # never written
    output_path = writable_path(output_path, reads=reads, what="output")
    writes = {output_path: "output"}  # each output once, and the dump apart from them
    if external_data:
        writes[writable_path(external_data_path(output_path), reads=reads, what="external data")] = "external data"
    if report_path is not None:
        report_path = writable_path(report_path, reads=reads, what="{report_path}")
        if any(_same_path(report_path, path) for path in writes):
            raise OutputError(f"{{report_path}} '{report_path}' is a file the output model is written to; "
                              "choose another", "report_path")
        writes[report_path] = "{report_path}"
    genai, genai_notes = genai_folder(input_path, output_path, reads=reads, writes=writes)
    writes.update(dict.fromkeys(genai, "onnxruntime-genai file"))
    if dump_qubo is not None:
        dump_directory(dump_qubo, reads=reads, writes=writes)
    if options.solution_dir is not None and not options.solution_dir.is_dir():
        raise OptionError(f"{{load_solution}} '{load_solution}' is not a directory", "load_solution")
    if options.ray_address is not None:
        distributed.connect(options.ray_address)
    float_model, calib_data, eval_data = _load_inputs(model, input_path, calibration, evaluation, batch_size)
    bar = Progress(enabled=progress)
    input_bytes = model.ByteSize() if isinstance(model, onnx.ModelProto) else sum(  # external data files included
        path.stat().st_size for path, role in reads.items() if "input model" in role)
    rotated = rotate_inputs(float_model, rotation, rotation_block, options.seed)
    if options.automatic:
        calibrated = calibrate(rotated, calib_data, bar, options.exclude, options.activations,
                               options.activation_range, options.max_memory)
        result = quantize_auto(calibrated, options, bar, input_bytes=input_bytes)
    else:
        result = quantize_model(rotated, calib_data, options, bar)
    quantized = result.model
    inserted = online_rotations(rotated)
    skipped = [node for node in result.skipped if node.name not in inserted]
    lm = language_model(float_model)
    if lm is not None:  # next-token perplexity, streamed: an LM's logits over all windows need not fit in memory
        evaluation = evaluate_language_model(lm, float_model, quantized, eval_data, bar, portable=result.reference)
    else:
        evaluation = evaluate(reference_scores(float_model, eval_data, bar), quantized, bar,
                              portable=result.reference)
    timing = measure_speed(float_model, quantized, eval_data, first_run(lm, eval_data) if lm else None) \
        if speed else None
    with Outputs() as outputs:  # after every check: an error or Ctrl-C leaves the outputs as they were
        written = outputs.add_model(output_path, quantized, external_data=external_data, reads=reads)
        report = Report(
            input_path=None if input_path is None else str(input_path), output_path=str(output_path),
            bits=options.bits, scale=str(options.scale), solver="loaded" if load_solution else options.solver.name,
            calibration=calib_data.origin, calibration_samples=calib_data.num_samples, layers=result.layers,
            skipped=skipped,
            evaluation=evaluation, speed=timing,
            input_bytes=input_bytes,
            output_bytes=outputs.size(written),
            seconds=time.perf_counter() - started, notes=result.notes + genai_notes,
            scheme=options.describe() + describe_rotation(rotation, rotation_block))
        for path, content in genai.items():
            outputs.add(path, content, "onnxruntime-genai file")
        if report_path is not None:
            outputs.add(report_path, report.to_json().encode(), "{report_path}")
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
    bits = [check_bits(b) for b in bits]
    scale_methods = [parse_choice(ScaleMethod, scale, "scales") for scale in scales]
    chosen = [solver_for(s) for s in solvers]
    for option, given in (("bits", bits), ("scales", scale_methods), ("solvers", chosen)):
        if not given:
            raise OptionError(f"{{{option}}} names none: give at least one to compare", option)
    samples = check_integer(samples, "samples", minimum=0)
    scheme = QuantizeOptions.parse(bits=min(bits, default=8), granularity=granularity, block_size=block_size,
                             symmetric=symmetric, bias=bias, activations=activations,
                             activation_range=activation_range, sequential=sequential, lower_bound=False)
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    float_model, calib_data, eval_data = _load_inputs(model, input_path, calibration, evaluation, batch_size)
    bar = Progress(enabled=progress)
    calibrated = calibrate(float_model, calib_data, bar, activations=scheme.activations,
                           activation_range=scheme.activation_range)
    reference = reference_scores(float_model, eval_data, bar)
    name = input_path.name if input_path else float_model.graph.name
    return run_comparison(calibrated, reference, bits, scale_methods, chosen, samples, seed, bar, name, scheme)


def sensitivity(model: str | os.PathLike | onnx.ModelProto, *, calibration: Any = None, evaluation: Any = None,
                bits: int = 4, scale: str = "mse", solver: str | Solver = "fast", seed: int = 0,
                batch_size: int = 256, exclude: Sequence[str] = (), granularity: str = "channel",
                block_size: int = 0, symmetric: bool = True, bias: str = "float", activations: str = "none",
                activation_range: str = "minmax", progress: bool = False) -> Sensitivity:
    """Each layer's contribution to the model's output error: the float model with only that
    layer quantized (the integers ``quantize`` would write with these options), run in
    onnxruntime on the evaluation data (the calibration data if none). Costs one solve of
    every layer and one onnxruntime run of the data per layer; nothing is written."""
    options = QuantizeOptions.parse(bits=bits, scale=scale, solver=solver, seed=seed, granularity=granularity,
                                    block_size=block_size, symmetric=symmetric, bias=bias, activations=activations,
                                    activation_range=activation_range, exclude=tuple(exclude))
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    float_model, calib_data, eval_data = _load_inputs(model, input_path, calibration, evaluation, batch_size)
    bar = Progress(enabled=progress)
    started = time.perf_counter()
    calibrated = calibrate(float_model, calib_data, bar, options.exclude, options.activations,
                           options.activation_range)
    reference = reference_scores(float_model, eval_data, bar)
    measured = measure(calibrated, make_plan(options, calibrated.layers), reference, bar)
    return Sensitivity(input_path.name if input_path else float_model.graph.name, options.bits, options.describe(),
                       eval_data.origin, eval_data.num_samples, measured.sensitivities,
                       time.perf_counter() - started)


def _load_inputs(model: str | os.PathLike | onnx.ModelProto, input_path: Path | None, calibration: Any,
                 evaluation: Any, batch_size: int) -> tuple[onnx.ModelProto, Dataset, Dataset]:
    """The float model, calibration data, and evaluation data (the calibration data if none)."""
    batch_size = check_integer(batch_size, "batch_size", minimum=1)
    float_model = prepare(model if isinstance(model, onnx.ModelProto) else load_model(model))
    calibration = _beside(input_path, CALIB_SUFFIX) if calibration is None else calibration
    if calibration is None:
        where = f", or put '{input_path.stem}{CALIB_SUFFIX}' beside the model" if input_path else ""
        raise OptionError("no calibration data: give {calibration} (an .npz of arrays keyed by the model's input "
                          f"names){where}", "calibration")
    calib_data = load_dataset(calibration, float_model, batch_size)
    evaluation = _beside(input_path, EVAL_SUFFIX) if evaluation is None else evaluation
    eval_data = calib_data if evaluation is None else load_dataset(evaluation, float_model, batch_size)
    lm = language_model(float_model)
    if lm is not None:  # before the long run
        check_tokens(lm, calib_data)
        check_tokens(lm, eval_data)
    return float_model, calib_data, eval_data


def _beside(model_path: Path | None, suffix: str) -> Path | None:
    """``<dir>/<stem><suffix>`` when the model is a file and that file exists."""
    if model_path is None:
        return None
    candidate = model_path.with_name(model_path.stem + suffix)
    return candidate if candidate.is_file() else None


def _same_path(a: Path, b: Path) -> bool:
    """Whether two paths name one file (resolved; hard links included)."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
