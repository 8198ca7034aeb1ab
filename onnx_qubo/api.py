"""The library API: ``quantize(model, config, calibration)`` returns the quantized model and its
report in memory; ``evaluate``, ``measure_speed`` and ``save`` are separate steps on that
``Result`` (the CLI composes them). ``compare`` and ``sensitivity`` are the studies."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx

from .autoscheme import quantize_auto
from .backends.kernels import Format, auto_accuracy_level
from .calibration.data import Dataset, load_dataset
from .calibration.memory import return_freed_memory
from .calibration.padding import padding_note, with_padding_mask
from .config import HEAD_BITS, QuantizeConfig, default_damping
from .core.choice import parse_choice
from .core.errors import OptionError, OutputError
from .core.external import materialize
from .core.options import AUTO, Rotation, ScaleMethod, check_bits, check_integer
from .core.progress import Progress
from .core.report import Report
from .evaluation.perplexity import check_tokens, evaluate_language_model, first_run, language_model
from .evaluation.verify import evaluate as evaluate_scores
from .evaluation.verify import measure_speed as time_models
from .evaluation.verify import reference_scores
from .graph.files import (
    Outputs,
    dump_directory,
    external_data_path,
    genai_folder,
    inputs_read,
    load_model,
    writable_path,
)
from .model.rotation import half_precision_layer, normalized_layer, rotated
from .passes import online_rotations
from .pipeline import calibrate, prepare, quantize_model
from .plan import make_plan
from .rounding import workers as distributed
from .rounding.solvers import SOLVERS
from .studies.compare import Comparison, study_damping
from .studies.compare import compare as run_comparison
from .studies.contribution import Sensitivity, measure

CALIB_SUFFIX, EVAL_SUFFIX = ".calib.npz", ".eval.npz"
FOLD_WEIGHTS_OPTION = "session.disable_quant_qdq"  # onnxruntime: no QDQ fusions, so the weights' DequantizeLinear folds
ModelSource = str | os.PathLike | onnx.ModelProto


@dataclass(frozen=True, eq=False)
class Result:
    """A quantized model and its report, with what the later steps compare it with: the float
    model, the portable (DequantizeLinear) model of the same codes, and the files the run read
    (never written by ``save``)."""

    model: onnx.ModelProto
    report: Report
    config: QuantizeConfig
    float_model: onnx.ModelProto
    portable: onnx.ModelProto
    input_path: Path | None
    reads: Mapping[Path, str]
    calibration: Dataset
    started: float = field(default_factory=time.perf_counter)

    def _with(self, **report: Any) -> Result:
        """This result with report fields set, its time in all updated."""
        return replace(self, report=replace(self.report, seconds=time.perf_counter() - self.started, **report))


@distributed.closing_ray  # a Ray cluster the run starts ends with it, on every exit path
def quantize(model: ModelSource, config: QuantizeConfig | None = None, calibration: Any = None, *,
             progress: bool = False) -> Result:
    """Quantize the dense layers of ``model`` (a ``ModelProto``, or a path whose external data is
    read where it lies) as ``config`` says (default: ``QuantizeConfig()``), in memory.

    ``calibration``: an .npz path (arrays keyed by input name), a dict of arrays, or an
    onnxruntime ``CalibrationDataReader``; for a model path, ``<stem>.calib.npz`` beside it when
    not given. Nothing is written but ``config.rounding.dump_qubo``'s QUBOs when asked; the input
    model is never modified. Raises a ``QuboInputError`` (errors.py) on bad input."""
    started = time.perf_counter()
    config = QuantizeConfig() if config is None else config
    if not isinstance(config, QuantizeConfig):
        raise OptionError(f"config must be a QuantizeConfig, got {type(config).__name__}")
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    load_solution = config.rounding.load_solution
    reads = inputs_read(model, calibration, None, load_solution)
    if config.rounding.dump_qubo is not None:
        dump_directory(config.rounding.dump_qubo, reads=reads)
    if load_solution is not None and not Path(load_solution).is_dir():
        raise OptionError(f"{{load_solution}} '{load_solution}' is not a directory", "load_solution")
    if config.execution.ray_address is not None:
        distributed.connect(config.execution.ray_address)
    float_model = prepare(model if isinstance(model, onnx.ModelProto) else load_model(model))
    config = _resolved(config, float_model)
    calib_data = _dataset(float_model, input_path, calibration, CALIB_SUFFIX, config.execution.batch_size,
                          config.rounding.padding_mask)
    bar = Progress(enabled=progress)
    input_bytes = model.ByteSize() if isinstance(model, onnx.ModelProto) else sum(  # external data files included
        path.stat().st_size for path, role in reads.items() if "input model" in role)
    rounding = config.rounding  # a rotated model computes what the float one does: the float one stays the reference
    with rotated(float_model, rounding.rotate, rounding.rotate_block, rounding.seed, rounding.rotate_convs,
                 rounding.rotate_residual) as model_in:
        if config.automatic.enabled:
            calibrated = calibrate(model_in, calib_data, bar, config.automatic.exclude, config.activations.dtype,
                                   config.activations.range, config.execution.max_memory_bytes,
                                   config.output.format, rounding.levels, rounding.damping == AUTO)
            quantized = quantize_auto(calibrated, config, bar, input_bytes=input_bytes)
        else:
            quantized = quantize_model(model_in, calib_data, config, bar)
        if model_in is not float_model:  # its float tensors left in the outputs, before its folder goes
            materialize(quantized.model)
            materialize(quantized.reference)
        inserted = online_rotations(model_in)  # the online rotations' MatMuls are ours, not skipped layers
    report = Report(
        input_path=None if input_path is None else str(input_path), output_path=None, bits=config.weights.bits,
        scale=str(config.rounding.scale), solver="loaded" if load_solution else config.rounding.solver_text,
        calibration=calib_data.origin, calibration_samples=calib_data.num_samples, layers=quantized.layers,
        skipped=[node for node in quantized.skipped if node.name not in inserted], evaluation=None,
        input_bytes=input_bytes, output_bytes=None,
        seconds=time.perf_counter() - started, scheme=config.describe(),
        notes=[*padding_note(calib_data), *quantized.notes])
    return Result(quantized.model, report, config, float_model, quantized.reference, input_path, reads, calib_data,
                  started)


def _resolved(config: QuantizeConfig, model: onnx.ModelProto) -> QuantizeConfig:
    """``config`` with its ``auto`` options made concrete for ``model``: the accuracy level
    (backends.kernels.auto_accuracy_level; 0 where no MatMulNBits is written); for a language
    model the Gram matrices damped by 1% and no ``--small-layers`` (its k/v projections would
    qualify at 5%; not measured), elsewhere below ``HEAD_BITS`` bits each Gram matrix damped by its
    own samples' spread (``--damping auto``: measured on the real-model benchmark's models,
    docs/results.md, "Automatic damping"); for a transformer (a language model, or layers reading a
    LayerNorm/RMSNorm: rotation.normalized_layer) with float32 weights below ``HEAD_BITS`` bits,
    inputs rotated (a Hadamard transform of the whole width) and scales refitted (fit), each
    unless given (measured on SmolLM2-135M and all-MiniLM-L6-v2, blocks of 32: docs/llm.md,
    docs/results.md "Transformer defaults")."""
    changes: dict[str, object] = {}
    is_lm = language_model(model) is not None
    if config.output.ort_accuracy_level is None:
        level = 0
        if config.output.format == Format.ORT and not config.activations.quantized:
            scheme = config.weights.scheme(config.weights.bits)
            level = auto_accuracy_level(is_lm, config.widths, scheme.block_size)
        changes["ort_accuracy_level"] = level
    rounding = config.rounding
    low_bits = (config.weights.bits < HEAD_BITS and (is_lm or normalized_layer(model) is not None)
                and half_precision_layer(model) is None)  # a float32 transformer below 4 bits
    if rounding.rotate == Rotation.AUTO:
        changes["rotate"] = Rotation.WHOLE if low_bits else Rotation.NONE
        for name in ("rotate_convs", "rotate_residual"):
            if getattr(rounding, name) and not low_bits:
                raise OptionError(f"{{{name}}} rotates with {{rotate}}, which is none for this model by default: "
                                  "give --rotate hadamard or whole", name, "rotate")
    if rounding.scale == ScaleMethod.AUTO:
        changes["scale"] = ScaleMethod.FIT if low_bits else ScaleMethod.MSE
    if rounding.damping is None:
        changes["damping"] = default_damping(is_lm, config.weights.bits)
    if is_lm and config.weights.small_layers is None:  # measured on Conv networks, not on language models
        changes["small_layers"] = 0.0
    return config.updated(**changes) if changes else config


def evaluate(result: Result, evaluation: Any = None, *, progress: bool = False) -> Result:
    """``result`` with its report's evaluation: the float and the quantized model run in
    onnxruntime on ``evaluation`` (as ``calibration`` for ``quantize``; default ``<stem>.eval.npz``
    beside the model, else the calibration data), and the quantized model at the default and
    basic levels against the portable model with optimizations disabled. A language model (an
    ``input_ids`` input and rank-3 logits, perplexity.py) is scored by next-token perplexity,
    streamed."""
    return_freed_memory()  # what quantize freed (its statistics, QUBOs, sessions), before two more sessions
    data = _evaluation_data(result, evaluation)
    bar = Progress(enabled=progress)
    lm = language_model(result.float_model)
    if lm is not None:
        scores = evaluate_language_model(lm, result.float_model, result.model, data, bar, portable=result.portable)
    else:
        scores = evaluate_scores(reference_scores(result.float_model, data, bar), result.model, bar,
                                 portable=result.portable)
    return result._with(evaluation=scores)


def measure_speed(result: Result, evaluation: Any = None) -> Result:
    """``result`` with its report's speed: the float and the quantized model timed at batch 1 and
    one evaluation batch (data as for ``evaluate``)."""
    data = _evaluation_data(result, evaluation)
    lm = language_model(result.float_model)
    timing = time_models(result.float_model, result.model, data, first_run(lm, data) if lm else None)
    notes = result.report.notes
    dequantized = any(node.op_type == "DequantizeLinear" for node in result.model.graph.node)
    if dequantized and not result.config.activations.quantized and timing.quantized_single > timing.float_single:
        notes = [*notes, f"onnxruntime dequantizes the weights on every run here; with the session option "
                 f"{FOLD_WEIGHTS_OPTION}=1 it folds them once at load and runs at float speed, holding float "
                 "weights (or --format ort: docs/results.md, \"Which format should I use?\")"]
    return result._with(speed=timing, notes=notes)


@dataclass(frozen=True)
class Destination:
    """Where ``save`` writes, every path checked: the model (and its external data), the report,
    and the onnxruntime-genai files copied beside the output when the input's folder is one."""

    output_path: Path
    report_path: Path | None
    genai: Mapping[Path, bytes]
    notes: list[str]
    reads: Mapping[Path, str]


def destination(model: ModelSource, output_path: str | os.PathLike, config: QuantizeConfig, *,
                calibration: Any = None, evaluation: Any = None, report_path: str | os.PathLike | None = None,
                also_read: Mapping[Path, str] | None = None) -> Destination:
    """Check, before a long run, that its outputs may be written: never over a file it reads
    (``model``, its data, ``also_read``), each path once. ``save`` takes the result."""
    reads = {**(also_read or {}), **inputs_read(model, calibration, evaluation, config.rounding.load_solution)}
    output = writable_path(output_path, reads=reads, what="output")
    writes = {output: "output"}  # each output once, and the dump apart from them
    if config.output.external_data:
        writes[writable_path(external_data_path(output), reads=reads, what="external data")] = "external data"
    report = None
    if report_path is not None:
        report = writable_path(report_path, reads=reads, what="{report_path}")
        if any(_same_path(report, path) for path in writes):
            raise OutputError(f"{{report_path}} '{report}' is a file the output model is written to; "
                              "choose another", "report_path")
        writes[report] = "{report_path}"
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    genai, notes = genai_folder(input_path, output, reads=reads, writes=writes)
    writes.update(dict.fromkeys(genai, "onnxruntime-genai file"))
    if config.rounding.dump_qubo is not None:
        dump_directory(config.rounding.dump_qubo, reads=reads, writes=writes)
    return Destination(output, report, genai, notes, reads)


def save(result: Result, to: str | os.PathLike | Destination, *,
         report_path: str | os.PathLike | None = None) -> Result:
    """Write the quantized model (``config.output.external_data``: its tensors to ``<output>.data``;
    always past protobuf's 2 GB limit), the onnxruntime-genai files beside it when the input's
    folder is one, and the report as JSON to ``report_path``: all or none. Returns the result
    with the output in its report."""
    if not isinstance(to, Destination):
        model = result.model if result.input_path is None else result.input_path
        to = destination(model, to, result.config, report_path=report_path, also_read=result.reads)
    with Outputs() as outputs:  # an error or Ctrl-C leaves the outputs as they were
        written = outputs.add_model(to.output_path, result.model, external_data=result.config.output.external_data,
                                    reads=to.reads)
        saved = result._with(output_path=str(to.output_path), output_bytes=outputs.size(written),
                             notes=result.report.notes + to.notes)
        for path, content in to.genai.items():
            outputs.add(path, content, "onnxruntime-genai file")
        if to.report_path is not None:
            outputs.add(to.report_path, saved.report.to_json().encode(), "{report_path}")
    return saved


def compare(model: str | os.PathLike | onnx.ModelProto, *, calibration: Any = None,
            evaluation: Any = None, bits: Sequence[int] = (8, 4, 3, 2, 1),
            scales: Sequence[str] = ("minmax", "mse"), solvers: Sequence[str] = ("rtn", "fast"),
            samples: int = 0, seed: int = 0, batch_size: int = 256, granularity: str = "channel",
            block_size: int = 0, symmetric: bool | None = None, float_zero_points: bool = False,
            bias: str = "float", bias_correction: bool | None = None, activations: str = "none",
            activation_range: str = "minmax", sequential: bool | None = None, padding_mask: str = AUTO,
            progress: bool = False) -> Comparison:
    """Quantize ``model`` for every bit width x scale x solver and evaluate each in onnxruntime
    (nothing is written). ``samples`` > 0 adds the cost-accuracy study: that many random
    roundings around the best QUBO solution per bit width. Data and scheme as for ``quantize``."""
    bits = [check_bits(b) for b in bits]
    scale_methods = [parse_choice(ScaleMethod, scale, "scales") for scale in scales]
    if ScaleMethod.AUTO in scale_methods:
        raise OptionError("{scales} names the methods to compare (mse, minmax, qubo, fit), not auto", "scales")
    chosen = [_solver_name(s) for s in solvers]
    for option, given in (("bits", bits), ("scales", scale_methods), ("solvers", chosen)):
        if not given:
            raise OptionError(f"{{{option}}} names none: give at least one to compare", option)
    samples = check_integer(samples, "samples", minimum=0)
    scheme = QuantizeConfig.from_flat(bits=min(bits, default=8), granularity=granularity, block_size=block_size,
                                      symmetric=symmetric, float_zero_points=float_zero_points, bias=bias,
                                      bias_correction=bias_correction, activations=activations,
                                      activation_range=activation_range, sequential=sequential,
                                      padding_mask=padding_mask)
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    float_model, calib_data, eval_data = _load_inputs(model, input_path, calibration, evaluation, batch_size,
                                                      scheme.rounding.padding_mask)
    bar = Progress(enabled=progress)
    calibrated = calibrate(float_model, calib_data, bar, activations=scheme.activations.dtype,
                           activation_range=scheme.activations.range,
                           spread=any(study_damping(float_model, b) == AUTO for b in bits))
    reference = reference_scores(float_model, eval_data, bar)
    name = input_path.name if input_path else float_model.graph.name
    return run_comparison(calibrated, reference, bits, scale_methods, chosen, samples, seed, bar, name, scheme)


def sensitivity(model: str | os.PathLike | onnx.ModelProto, *, calibration: Any = None, evaluation: Any = None,
                bits: int = 4, scale: str = "mse", solver: str = "fast", seed: int = 0,
                batch_size: int = 256, exclude: Sequence[str] = (), granularity: str = "channel",
                block_size: int = 0, symmetric: bool | None = None, float_zero_points: bool = False,
                bias: str = "float", bias_correction: bool | None = None, activations: str = "none",
                activation_range: str = "minmax", padding_mask: str = AUTO, progress: bool = False) -> Sensitivity:
    """Each layer's contribution to the model's output error: the float model with only that
    layer quantized (the integers ``quantize`` would write with these options), run in
    onnxruntime on the evaluation data (the calibration data if none). Costs one solve of
    every layer and one onnxruntime run of the data per layer; nothing is written."""
    options = QuantizeConfig.from_flat(bits=bits, scale=scale, solver=solver, seed=seed, granularity=granularity,
                                       block_size=block_size, symmetric=symmetric,
                                       float_zero_points=float_zero_points, bias=bias,
                                       bias_correction=bias_correction, activations=activations,
                                       activation_range=activation_range, exclude=tuple(exclude),
                                       padding_mask=padding_mask)
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    float_model, calib_data, eval_data = _load_inputs(model, input_path, calibration, evaluation, batch_size,
                                                      options.rounding.padding_mask)
    options = options.updated(damping=study_damping(float_model, options.weights.bits))
    bar = Progress(enabled=progress)
    started = time.perf_counter()
    calibrated = calibrate(float_model, calib_data, bar, options.automatic.exclude, options.activations.dtype,
                           options.activations.range, spread=options.rounding.damping == AUTO)
    reference = reference_scores(float_model, eval_data, bar)
    measured = measure(calibrated, make_plan(options, calibrated.layers), reference, bar)
    name = input_path.name if input_path else float_model.graph.name
    return Sensitivity(name, options.weights.bits, options.describe(),
                       eval_data.origin, eval_data.num_samples, measured.sensitivities,
                       time.perf_counter() - started)


def _load_inputs(model: ModelSource, input_path: Path | None, calibration: Any, evaluation: Any, batch_size: int,
                 padding_mask: str = AUTO) -> tuple[onnx.ModelProto, Dataset, Dataset]:
    """The float model, calibration data, and evaluation data (the calibration data if none),
    their padded positions marked by ``padding_mask`` (``--padding-mask``)."""
    batch_size = check_integer(batch_size, "batch_size", minimum=1)
    float_model = prepare(model if isinstance(model, onnx.ModelProto) else load_model(model))
    calib_data = _dataset(float_model, input_path, calibration, CALIB_SUFFIX, batch_size, padding_mask)
    if evaluation is None and _beside(input_path, EVAL_SUFFIX) is None:
        return float_model, calib_data, calib_data
    return float_model, calib_data, _dataset(float_model, input_path, evaluation, EVAL_SUFFIX, batch_size,
                                             padding_mask)


def _solver_name(solver: object) -> str:
    if solver not in SOLVERS:
        raise OptionError(f"{{solvers}} must be among {', '.join(SOLVERS)}, got {solver!r}", "solvers")
    return str(solver)


def run(model: ModelSource, output_path: str | os.PathLike, config: QuantizeConfig | None = None, *,
        calibration: Any = None, evaluation: Any = None, report_path: str | os.PathLike | None = None,
        speed: bool = True, progress: bool = False) -> Result:
    """The whole job, as the CLI does it: check the outputs, ``quantize``, ``evaluate``,
    ``measure_speed`` (``speed``) and ``save`` (the report also as JSON to ``report_path``)."""
    config = QuantizeConfig() if config is None else config
    target = destination(model, output_path, config, calibration=calibration, evaluation=evaluation,
                         report_path=report_path)
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    if evaluation is not None or _beside(input_path, EVAL_SUFFIX) is not None:  # checked before the long run
        graph = model if isinstance(model, onnx.ModelProto) else load_model(model)
        evaluation = _dataset(graph, input_path, evaluation, EVAL_SUFFIX, config.execution.batch_size,
                              config.rounding.padding_mask)
    result = evaluate(quantize(model, config, calibration, progress=progress), evaluation, progress=progress)
    if speed:
        result = measure_speed(result, evaluation)
    return save(result, target)


def _dataset(float_model: onnx.ModelProto, input_path: Path | None, source: Any, suffix: str,
             batch_size: int, padding_mask: str = AUTO) -> Dataset:
    """Calibration data (``suffix`` CALIB_SUFFIX) or evaluation data from ``source``, or from
    the file beside the model; checked against a language model's vocabulary; its padded
    positions marked as ``padding_mask`` says (padding.py)."""
    source = _beside(input_path, suffix) if source is None else source
    if source is None:
        where = f", or put '{input_path.stem}{suffix}' beside the model" if input_path else ""
        raise OptionError("no calibration data: give {calibration} (an .npz of arrays keyed by the model's input "
                          f"names){where}", "calibration")
    data = load_dataset(source, float_model, batch_size)
    lm = language_model(float_model)
    if lm is not None:  # before the long run
        check_tokens(lm, data)
    return with_padding_mask(data, float_model, padding_mask,
                             "calibration data" if suffix == CALIB_SUFFIX else "evaluation data")


def _evaluation_data(result: Result, evaluation: Any) -> Dataset:
    """The evaluation data: given (loaded already when a ``Dataset``), beside the model, or the
    calibration data."""
    if isinstance(evaluation, Dataset):
        return evaluation
    if evaluation is None and _beside(result.input_path, EVAL_SUFFIX) is None:
        return result.calibration
    return _dataset(result.float_model, result.input_path, evaluation, EVAL_SUFFIX,
                    result.config.execution.batch_size, result.config.rounding.padding_mask)


def _beside(model_path: Path | None, suffix: str) -> Path | None:
    """``<dir>/<stem><suffix>`` when the model is a file and that file exists."""
    if model_path is None:
        return None
    candidate = model_path.with_name(model_path.stem + suffix)
    return candidate if candidate.is_file() else None


def _same_path(a: Path, b: Path) -> bool:
    """Whether two paths name one file (resolved; hard links included)."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
