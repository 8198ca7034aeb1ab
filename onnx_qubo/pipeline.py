"""The data flow of DESIGN.md, one stage per line; orchestration only.

    model --calibrate (find layers, input quantizers, streamed statistics)--> Calibrated
          --make_plan (options resolved per layer)--> Plan
          --solve_layers (prepare_layer -> rounding -> finish, per layer)--> SolvedLayer...
          --rewrite (raise opset, lower each layer, check)--> quantized model

With ``sequential``, each layer's statistics are gathered again from the model whose earlier
layers are already quantized (their inputs as deployed), against the float model's: in one pass
for the layers reading one input (a Conv's groups, q/k/v), again only once a layer it depends on
has been quantized since.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Collection, Iterator, Mapping, Sequence

import numpy as np
import onnx

from .backends.kernels import PORTABLE, Format, needs_output_range, padding_notes
from .calibration import memory
from .calibration.activations import input_quantizers
from .calibration.data import Dataset
from .calibration.statistics import LayerStatistics, collect_statistics
from .config import HEAD_BITS, SMALL_BITS, QuantizeConfig
from .core import external
from .core.errors import ModelError, OptionError
from .core.grid import InputQuantizer
from .core.options import AUTO, Activations, RangeMethod
from .core.progress import Progress
from .core.report import LayerReport
from .core.types import DenseLayer, InputStatistics, QuantizedLayer, SkippedNode
from .forms.gather import QuantizedTable, find_tables, quantize_table_on
from .layer import SolvedLayer, prepare_layer
from .model import discovery
from .model.groups import merge_groups, merge_reports, split_groups
from .model.lowering import rewrite, run_passes
from .passes import FoldConstantWeights, PrepareSubgraphs
from .plan import Plan, layers_at_head_bits, make_plan, small_layers
from .rounding import exchange

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Calibrated:
    """A float model's dense layers and the statistics of their inputs: gathered once,
    reusable for any number of quantization settings (``onnx-qubo compare``)."""

    model: onnx.ModelProto
    dataset: Dataset
    layers: list[DenseLayer]
    skipped: list[SkippedNode]
    statistics: Mapping[str, InputStatistics]  # layer statistics_key -> statistics (gathered when first read)
    quantizers: dict[str, InputQuantizer]  # layer input tensor -> its quantizer (quantized inputs only)
    output_quantizers: dict[str, InputQuantizer]  # output tensor of a Conv QLinearConv may run -> its quantizer


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with weights that exporters hide behind Constant nodes or Transpose/Cast/...
    chains, or inside If/Loop/Scan bodies, as plain main-graph initializers (same outputs):
    what discovery and the rewrite work on."""
    return run_passes(model, [PrepareSubgraphs(), FoldConstantWeights(external.read_array)]).model


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantization run's result: the model, what was done per layer, and the portable
    (DequantizeLinear) model of the same codes as the reference to check a fast format against."""

    model: onnx.ModelProto
    layers: list[LayerReport]
    skipped: list[SkippedNode]
    reference: onnx.ModelProto
    notes: list[str]


def quantize_model(model: onnx.ModelProto, calibration: Dataset, config: QuantizeConfig,
                   progress: Progress) -> Quantized:
    """Quantize every dense layer of ``model`` but the excluded ones."""
    calibrated = calibrate(model, calibration, progress, config.automatic.exclude, config.activations.dtype,
                           config.activations.range, config.execution.max_memory_bytes, config.output.format,
                           config.rounding.levels, config.rounding.damping == AUTO)
    heads = discovery.output_layers(model, calibrated.layers)
    tables, skipped, notes = [], calibrated.skipped, []
    if config.rounding.sequential is None:
        config = config.updated(sequential=sequential_by_default(model, calibrated.layers))
        if config.rounding.sequential:
            notes.append("sequential calibration (--sequential: the default where a Conv layer is fed by another "
                         "quantized layer)")
    small = small_layers(config, calibrated.layers, heads)
    plan = make_plan(config, calibrated.layers, heads, small)
    integers, reports = solve_all(calibrated, plan, progress, release=True)  # each layer solved once
    if config.rounding.damping == AUTO:  # the layers' ridges (the tables below have none)
        notes.append(damping_note(reports))
    memory.return_freed_memory()  # the solves' arrays, before the rewrite's copies
    if config.output.embeddings:  # no statistics needed: each lookup reads one row exactly (forms/gather.py)
        found, table_skips = find_tables(model)
        grids = config.weights.grids(config.weights.output_bits)  # the head's width: the model's other end
        tables = [quantize_table_on(table, [replace(s, scale_type=table.float_type) for s in grids])
                  for table in found]
        reports, skipped = reports + [table.report() for table in tables], skipped + table_skips
        if not tables:
            notes.append("embeddings: no Gather reads rows of a constant float table that only it reads")
    widening = config.weights.output_bits != config.weights.bits
    widened = [name for name in layers_at_head_bits(config, calibrated.layers, heads)
               if name not in config.automatic.layer_bits and widening]
    wide_tables = [table.table.name for table in tables if widening]
    if widened or wide_tables:
        why = "" if config.weights.head_bits is not None else f": the default below {HEAD_BITS} bits"
        what = [f"{kind}{'s' * (len(names) > 1)} {', '.join(names)}"
                for kind, names in (("output layer", widened), ("embedding table", wide_tables)) if names]
        notes.append(f"{' and '.join(what)} at {config.weights.output_bits} bits (--head-bits{why})")
    if small:
        why = "" if config.weights.small_layers is not None else f": the default below {HEAD_BITS} bits"
        notes.append(f"{len(small)} small layer{'s' * (len(small) > 1)} at {SMALL_BITS} bits, "
                     f"{config.weights.small_share * 100:g}% of the weights at most (--small-layers{why}): "
                     f"{', '.join(small)}")
    if plan.sequential and not any(discovery.fed_by_earlier(model, calibrated.layers)):
        notes.append("sequential calibration changes nothing here: no quantized layer feeds another, so each was "
                     "calibrated once on the float model's inputs")
    return finish(calibrated, integers, reports, skipped, plan.format, plan.accuracy_level, tables, notes,
                  mixable=not config.output.embeddings, packed=plan.pack_codes)


def solve_all(calibrated: Calibrated, plan: Plan, progress: Progress, release: bool = False
              ) -> tuple[list[QuantizedLayer], list[LayerReport]]:
    """Every layer's codes and report row (a grouped Conv's groups and a recurrent node's directions
    merged), keeping only the codes of each layer solved (its QUBO freed before the next);
    ``release`` as for ``solve_layers``."""
    integers, reports = [], []
    for solved in solve_layers(calibrated, plan, progress, release):
        integers.append(solved.quantized())
        reports.append(solved.report)
        del solved  # before the next layer's calibration pass and solve
    return merge_groups(integers), merge_reports(calibrated.layers, reports)


def finish(calibrated: Calibrated, quantized: list[QuantizedLayer], reports: list[LayerReport],
           skipped: list[SkippedNode], format: Format, accuracy_level: int, tables: Sequence[QuantizedTable] = (),
           notes: Sequence[str] = (), mixable: bool = True, packed: bool = False) -> Quantized:
    """The last step of every quantization path (the plain one and the automatic choice): each
    Conv QLinearConv may run given its output's quantizer, the model rewritten in ``format``, the
    portable model of the same codes as the reference, each report row (layers, then tables) given
    the kernel that runs it, and the notes of the rewrite before ``notes`` (``mixable``: whether
    the options allow --bits-per-weight, which the notes on wider storage then suggest; ``packed``:
    codes narrower than their type written at their width, passes/packed_codes.py)."""
    quantized = [replace(q, output_quantizer=calibrated.output_quantizers.get(q.layer.view.output or ""))
                 for q in quantized]
    written = rewrite(calibrated.model, quantized, format, accuracy_level, tables, packed)
    portable = written.model if format == Format.QDQ else rewrite(calibrated.model, quantized, tables=tables).model
    reports = [replace(r, kernel=k.kernel, kernel_fallback=k.fallback, kernel_bits=k.bits)
               for r, k in zip(reports, written.kernels)]
    qlinear = any(k.kernel == "QLinearConv" for k in written.kernels)
    rounding = ["QLinearConv also rounds each such Conv's output to 8 bits (range calibrated on the float model): "
                "the layer costs above leave that rounding out, and the comparison with the DequantizeLinear model "
                "includes it"] if qlinear else []
    return Quantized(written.model, reports, skipped, portable,
                     [*written.notes, *rounding, *notes, *wider_storage_notes(reports, mixable, packed),
                      *packed_notes(reports), *few_vectors_notes(reports),
                      *padding_notes(quantized, written.kernels, accuracy_level)])


def damping_note(reports: Sequence[LayerReport]) -> str:
    """What ``--damping auto`` chose: the range of the layers' ridges, and the largest's layer."""
    ridges = sorted((report.damping, report.name) for report in reports)
    low, (high, name) = ridges[0][0], ridges[-1]
    median = ridges[len(ridges) // 2][0]
    return (f"--damping auto: ridges of {low:.3g} to {high:.3g} of each Gram matrix's mean diagonal (median "
            f"{median:.3g}; the largest on {name}), from how much each varies between calibration samples")


def few_vectors_notes(reports: Sequence[LayerReport]) -> list[str]:
    """Where a layer saw no more calibration vectors than it has inputs: its Gram matrix is then
    singular, and the rounding is fitted to the part of its input space the data spans (silero-vad on
    128 chunks: 6 of its 8 layers, its last encoder Convs and LSTM Gemms; with 512 chunks its 3-bit
    output error fell from 0.255 to 0.192, docs/results.md)."""
    few = [report for report in reports if 0 < report.vectors <= report.f_in]
    if not few:
        return []
    named = ", ".join(f"{r.name} ({r.vectors} for {r.f_in} inputs)" for r in few[:3]) + ", ..." * (len(few) > 3)
    return [f"{len(few)} layer{'s' * (len(few) > 1)} saw at most as many calibration vectors as inputs, so the "
            f"rounding fits only the part of the input space the data spans: {named}; calibrate on more samples "
            "(each token, sample or Conv output position gives one vector)"]


def packed_notes(reports: Sequence[LayerReport]) -> list[str]:
    """Where DequantizeLinear's codes are packed at their own width (passes/packed_codes.py)."""
    packed: dict[tuple[int, str], int] = {}
    for report in reports:
        if report.kernel == PORTABLE and report.kernel_bits is not None:
            packed[report.kernel_bits, report.storage] = packed.get((report.kernel_bits, report.storage), 0) + 1
    return [f"{count} layer{'s' if count > 1 else ''} of {bits}-bit codes packed at {bits} bits (ONNX has no "
            f"{bits}-bit type): integer operators rebuild the {storage} tensor, which onnxruntime folds when it loads "
            "the model (--no-pack-codes stores it instead)" for (bits, storage), count in sorted(packed.items())]


def wider_storage_notes(reports: Sequence[LayerReport], mixable: bool = True, packed: bool = False) -> list[str]:
    """Where codes take more bits in the file than their width: a model no smaller than at the wider
    width, for the narrower width's fidelity, which a user asking for 3 bits should know (``packed``:
    --pack-codes was given, and left these layers as they are)."""
    wider: dict[tuple[int, int, str], int] = {}
    for report in reports:
        if 1 < report.bits < report.stored_bits:
            key = (report.bits, report.stored_bits, report.kernel if report.kernel_bits is not None else "")
            wider[key] = wider.get(key, 0) + 1
    notes = []
    for (bits, stored, kernel), count in sorted(wider.items()):
        layers = f"{count} layer{'s' if count > 1 else ''} of {bits}-bit codes"
        if kernel == "MatMulNBits" and bits == 2:
            notes.append(f"{layers} stored in 4-bit MatMulNBits weights (onnxruntime's 2-bit kernel is fast only "
                         "at --ort-accuracy-level 4, in blocks of 32-128 inputs): --format qdq stores them as INT2")
        elif kernel:
            why = f"onnxruntime has no {bits}-bit MatMulNBits" if kernel == "MatMulNBits" else \
                f"the kernel takes {stored}-bit weights only"
            notes.append(f"{layers} stored in {stored}-bit {kernel} weights ({why}): as large as at {stored} bits")
        else:
            narrower = 2 if stored == 4 else 4
            mix = (f"; --bits {narrower} with --bits-per-weight mixes {narrower}- and {stored}-bit layers into a "
                   "size between theirs") if mixable else ""
            pack = ("too small to gain from --pack-codes" if packed else
                    f"--pack-codes writes the larger ones at {bits} bits")
            notes.append(f"{layers} stored in {stored}-bit integers (ONNX has no {bits}-bit type): as large as at "
                         f"{stored} bits ({pack}){mix}")
    return notes


def calibrate(model: onnx.ModelProto, calibration: Dataset, progress: Progress, exclude: Collection[str] = (),
              activations: Activations = Activations.NONE,
              activation_range: RangeMethod = RangeMethod.MINMAX, max_memory: int | None = None,
              format: Format = Format.QDQ, levels: int = 2, spread: bool = False) -> Calibrated:
    """The model's layers and their input statistics, in as many passes over the data as
    ``max_memory`` (bytes; default: memory.py's) needs beside a solve with ``levels`` grid points
    per weight; with ``format`` ort and quantized
    ``activations``, the output ranges of the Convs QLinearConv may run, in the same passes as
    the input ranges. ``spread``: measure each input's sample spread too, which ``--damping auto``
    takes its ridges from."""
    check_declared_shapes(model)
    found, skipped = find_layers(model, exclude)
    layers = split_groups(found)  # a grouped Conv: one layer per group, each with its own Gram matrix
    outputs = [layer.view.output for layer in found if layer.view.output is not None
               and needs_output_range(layer, format, activations != Activations.NONE)]
    ranged = input_quantizers(model, layers, calibration, activations, activation_range, progress, outputs)
    quantizers = {layer.input_name: ranged[layer.input_name] for layer in layers if layer.input_name in ranged}
    groups = memory.calibration_groups(layers, max_memory, memory.weights_bytes(model), drift=bool(quantizers),
                                       levels=levels, spread=spread)
    if len(groups) > 1:
        log.info("calibrating in %d passes over the data: the statistics of all %d layers do not fit the memory "
                 "budget at once", len(groups), len(layers))
    statistics = LayerStatistics(model, groups, calibration, progress, quantizers, spread)
    main_graph = {out for node in model.graph.node for out in node.output} | {inp.name for inp in model.graph.input}
    in_bodies = {layer.statistics_key for layer in layers if layer.input_name not in main_graph}
    layers, skipped = _drop_never_run(layers, skipped, {key: statistics[key] for key in in_bodies})
    return Calibrated(model, calibration, layers, skipped, statistics, quantizers,
                      {name: ranged[name] for name in outputs if name in ranged})


def _drop_never_run(layers: list[DenseLayer], skipped: list[SkippedNode], statistics: dict[str, InputStatistics]
                    ) -> tuple[list[DenseLayer], list[SkippedNode]]:
    """Layers that saw no input on the calibration data (in an If branch never taken, a Loop that
    ran no iteration) join the skipped ones: there is nothing to fit their rounding to.
    ``statistics``: those of the layers inside subgraphs (a main-graph layer sees every batch)."""
    idle = [layer for layer in layers
            if layer.statistics_key in statistics and statistics[layer.statistics_key].count == 0]
    if not idle:
        return layers, skipped
    names = list(dict.fromkeys(layer.owner for layer in idle))
    skipped = skipped + [SkippedNode(name, next(x.op_type for x in idle if x.owner == name),
                                     "never ran on the calibration data (its If branch was not taken, or its "
                                     "Loop/Scan ran no iteration), so there is nothing to fit its rounding to")
                         for name in names]
    layers = [layer for layer in layers if layer.owner not in names]
    if not layers:
        raise ModelError("no dense layer ran on the calibration data: "
                         + "; ".join(f"{s.name}: {s.reason}" for s in skipped))
    return layers, skipped


def sequential_by_default(model: onnx.ModelProto, layers: list[DenseLayer]) -> bool:
    """``--sequential`` unset: on where a Conv layer is fed by another quantized layer. Measured
    (docs/results.md, "Sequential calibration"): on the Conv networks here it lowered the output
    error by 8-52% at 3 and 4 bits, for 1.2-5x the time; on a transformer it changed little for 3.7x,
    and a decoder's passes each run the whole model twice."""
    if not any(layer.op_type == "Conv" for layer in layers):
        return False
    fed = discovery.fed_by_earlier(model, layers)
    return any(feeds and layer.op_type == "Conv" for feeds, layer in zip(fed, layers))


def solve_layers(calibrated: Calibrated, plan: Plan, progress: Progress, release: bool = False
                 ) -> Iterator[SolvedLayer]:
    """Solve the layers one at a time, in graph order (a caller that keeps only the integers
    frees each QUBO); ``release``: free each input view's statistics after its last layer (for a
    caller that solves each layer once)."""
    deployed = None  # with ``sequential``: the model with the layers solved so far quantized
    unapplied: list[QuantizedLayer] = []  # solved, complete, not yet in ``deployed`` (rewritten when needed)
    pending = []  # the groups of a grouped Conv solved so far: deployed once the Conv is complete
    layers = [p.layer for p in plan.layers]
    feeders = discovery.latest_feeders(calibrated.model, layers) if plan.sequential else [-1] * len(layers)
    last_use = {layer.statistics_key: k for k, layer in enumerate(layers)}
    fresh: Mapping[str, InputStatistics] = {}  # one input's statistics, gathered at step ``fresh_from``
    fresh_from = -1
    for k, layer_plan in enumerate(plan.layers):
        key = layer_plan.layer.statistics_key
        statistics = calibrated.statistics[key]
        if feeders[k] >= 0 and (key not in fresh or feeders[k] >= fresh_from):  # earlier layers change its input
            if unapplied:
                deployed = rewrite(calibrated.model if deployed is None else deployed, unapplied).model
                unapplied = []
            fresh = {}  # held by nothing during the pass
            if deployed is not None:  # the layers reading the same input (a Conv's groups, q/k/v): one pass
                view = [p.layer for p in plan.layers[k:] if p.layer.source_key == layer_plan.layer.source_key]
                fresh = collect_statistics(calibrated.model, view, calibrated.dataset, progress, deployed,
                                           calibrated.quantizers, spread=layer_plan.damping == AUTO)
                fresh_from = k
        if feeders[k] >= 0 and key in fresh:
            statistics = fresh[key]
        work = prepare_layer(layer_plan, statistics, calibrated.quantizers.get(layer_plan.layer.input_name))
        if plan.dump_dir is not None:
            exchange.write_problem(plan.dump_dir, layer_plan.stem, work.problem)
        start = time.perf_counter()
        if plan.solution_dir is not None:
            choice = exchange.read_solution(plan.solution_dir, layer_plan.layer.name, work.problem)
        else:
            choice = work.solve(progress)
        solved = work.finish(choice, time.perf_counter() - start)
        pending.append(solved.quantized())
        layer = layer_plan.layer
        complete = layer.group is None or layer.group + 1 == layer.view.problems
        if plan.sequential and complete:
            unapplied += merge_groups(pending)
        if complete:
            pending = []
        if release and last_use[key] == k and isinstance(calibrated.statistics, LayerStatistics):
            calibrated.statistics.release(key)
            memory.return_freed_memory()
        yield solved
        del work, solved, statistics  # the next layer may start a calibration pass: hold nothing of this one
    if plan.dump_dir is not None:
        exchange.write_index(plan.dump_dir, [
            {"layer": p.layer.name, "file": f"{p.stem}.qubo.npz", "n_out": p.layer.shape[0],
             "f_in": p.layer.shape[1], "variables": p.variables, "bits": p.scheme.bits} for p in plan.layers])


def check_declared_shapes(model: onnx.ModelProto) -> None:
    """A ModelError naming a main-graph input or output that declares no shape, not even its rank:
    onnx's checker refuses such a model, so the quantized one could not be written."""
    initializers = {init.name for init in model.graph.initializer}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if value.name not in initializers and value.type.HasField("tensor_type") \
                    and not value.type.tensor_type.HasField("shape"):
                raise ModelError(f"model {kind} '{value.name}' declares no shape, not even its rank, which onnx's "
                                 "checker refuses in the quantized model too: declare it (symbolic names such as "
                                 "'batch' for sizes that vary)")


def find_layers(model: onnx.ModelProto, exclude: Collection[str] = ()
                ) -> tuple[list[DenseLayer], list[SkippedNode]]:
    """Dense layers to quantize (with finite weights, not excluded by name), or an error
    saying why there are none."""
    layers, skipped = discovery.find_dense_layers(model)
    unknown = set(exclude) - {layer.name for layer in layers}
    if unknown:
        raise OptionError(f"{{exclude}} names no dense layer: {', '.join(sorted(unknown))} "
                          "(onnx-qubo inspect lists the layers)", "exclude")
    skipped += [SkippedNode(layer.name, layer.op_type, "excluded on request")
                for layer in layers if layer.name in exclude]
    layers = [layer for layer in layers if layer.name not in exclude]
    if not layers:
        why = "; ".join(f"{s.name}: {s.reason}" for s in skipped) or "the graph has no Gemm or MatMul node"
        raise ModelError(f"no quantizable dense layers found ({why})")
    for layer in layers:
        if not np.isfinite(layer.weight).all():
            raise ModelError(f"weight '{layer.weight_name}' of layer '{layer.name}' holds NaN or Inf")
    return layers, skipped
