"""Command line: ``onnx-qubo IN.onnx OUT.onnx --bits 2`` and ``onnx-qubo inspect IN.onnx``.

Only parses flags, calls the Python API and prints; the work lives in api.py and below.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Iterator

import click

from . import api
from .activations import PERCENTILE
from .discovery import find_dense_layers
from .errors import Interrupted, NamesOptions, QuboError
from .files import inputs_read, load_model, writable_path, write_atomically
from .grid import MAX_BITS, MIN_BITS
from .kernels import Format
from .options import Activations, BiasMode, Granularity, RangeMethod, ScaleMethod
from .pipeline import prepare
from .solvers import SOLVERS, NealSolver

FLAGS = {"calibration": "--calib", "evaluation": "--eval", "report_path": "--report",  # API name -> flag,
         "symmetric": "--symmetric/--asymmetric", "ray_address": "--ray", "lower_bound": "--bound"}  # where not --name


def flag(option: str) -> str:
    """The flag that sets an API option."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


class Failure(click.ClickException):
    """A library error as the CLI shows it: one line, options named by their flags, and the
    exit status of its kind (errors.py)."""

    def __init__(self, error: QuboError):
        if isinstance(error, NamesOptions):
            super().__init__(error.render({option: flag(option) for option in error.options}))
        else:
            super().__init__(str(error))
        self.exit_code = error.exit_code  # type: ignore[misc]  # click reads it per instance


@contextlib.contextmanager
def failures_as_exit() -> Iterator[None]:
    try:
        yield
    except QuboError as exc:
        raise Failure(exc) from None


def choices(kind: type[Enum]) -> click.Choice:
    return click.Choice([str(member.value) for member in kind])


def verbose_option(command):
    """``-v``: log the decisions worth knowing (opset raised, layers skipped, forms) on stderr."""
    def turn_on(ctx, param, value: bool) -> None:
        if value:
            logging.basicConfig(level=logging.INFO, format="onnx-qubo: %(message)s", stream=sys.stderr)
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=turn_on,
                        help="Log decisions (opset raised, layers skipped, forms) on stderr.")(command)


@contextlib.contextmanager
def interrupts_as_exit() -> Iterator[None]:
    """SIGTERM raises ``Interrupted`` (main thread), so the cleanups Ctrl-C runs run for it too
    (worker processes, a Ray cluster, temporary files); either interrupt ends the command with one
    line and exit status 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""
    received: list[int] = []

    def terminate(signum: int, frame: object) -> None:
        received.append(signum)  # Ray turns any KeyboardInterrupt in its waits into a plain one
        raise Interrupted(signum)

    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if installed else None
    try:
        yield
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else received[-1] if received else signal.SIGINT
        click.echo(f"Error: interrupted by {signal.Signals(signum).name}", err=True)
        raise click.exceptions.Exit(128 + signum) from None
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _DefaultToQuantize(click.Group):
    """``onnx-qubo IN OUT ...`` means ``onnx-qubo quantize IN OUT ...``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["quantize", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with interrupts_as_exit():
            return super().invoke(ctx)


def _layer_bits(ctx, param, values: tuple[str, ...]) -> dict[str, int]:
    """LAYER=BITS pairs; the name may itself contain '=' (split at the last one)."""
    parsed = {}
    for value in values:
        name, sep, bits = value.rpartition("=")
        if not sep or not name or not bits.strip().isdigit():
            raise click.BadParameter(f"expected LAYER=BITS, got '{value}'")
        parsed[name] = int(bits)
    return parsed


def scheme_options(command):
    """The quantization-scheme flags, shared by ``quantize`` and ``compare``."""
    for option in reversed([
        click.option("--granularity", type=choices(Granularity), default="channel", show_default=True,
                     help="Weights sharing one scale: each output channel, the whole tensor, or blocks of "
                          "--block-size inputs within a channel (DequantizeLinear block_size, opset 21)."),
        click.option("--block-size", type=click.IntRange(min=1), default=None,
                     help="Inputs per scale block (with --granularity block; e.g. 32)."),
        click.option("--symmetric/--asymmetric", default=True, show_default=True,
                     help="Signed grid with zero point 0 (INT2/INT4/INT8), or unsigned grid with an integer "
                          "zero point per scale (UINT2/UINT4/UINT8)."),
        click.option("--bias", "bias_mode", type=choices(BiasMode), default="float", show_default=True,
                     help="float: keep it; quantize: a variable of each neuron's QUBO at the weights' bit width "
                          "(the paper); int32: input scale x weight scale (needs --activations)."),
        click.option("--activations", type=choices(Activations), default="none", show_default=True,
                     help="Quantize each layer's input per tensor (QuantizeLinear/DequantizeLinear); the QUBO "
                          "then sees the quantized inputs."),
        click.option("--activation-range", type=choices(RangeMethod), default="minmax", show_default=True,
                     help=f"Input ranges: observed min/max, or the {PERCENTILE}% percentile at both ends."),
        click.option("--sequential", is_flag=True,
                     help="Calibrate each layer on the outputs of the already quantized earlier layers "
                          "(target: the float model's outputs)."),
    ]):
        command = option(command)
    return command


def _scheme(granularity, block_size, symmetric, bias_mode, activations, activation_range, sequential) -> dict:
    """The scheme flags as keyword arguments of the API."""
    if (granularity == "block") != (block_size is not None):
        raise click.UsageError("--block-size goes with --granularity block, and --granularity block needs it")
    return dict(granularity=granularity, block_size=block_size or 0, symmetric=symmetric, bias=bias_mode,
                activations=activations, activation_range=activation_range, sequential=sequential)


@click.group(cls=_DefaultToQuantize, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-qubo")
def main():
    """Quantize the dense layers of an ONNX model to low-bit integers by QUBO rounding.

    \b
    onnx-qubo model.onnx out.onnx --bits 2      (same as: onnx-qubo quantize ...)
    onnx-qubo compare model.onnx --samples 30   (bit widths x scales x solvers)
    onnx-qubo inspect model.onnx
    """


@main.command()
@click.argument("input_model", type=click.Path())
@click.argument("output_model", type=click.Path())
@click.option("--bits", type=click.IntRange(MIN_BITS, MAX_BITS), default=2, show_default=True,
              help="Weight bit width (INT2/UINT2 storage for 1-2, INT4/UINT4 for 3-4, INT8/UINT8 for 5-8).")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration .npz keyed by input name [default: <model stem>.calib.npz beside it].")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), default=None,
              help="Evaluation .npz (inputs + optional 'labels') [default: <model stem>.eval.npz "
                   "beside it, else the calibration data].")
@click.option("--scale", type=choices(ScaleMethod), default="mse", show_default=True,
              help="mse: clipping ratio per scale group searched on the QUBO cost of round-to-nearest; "
                   "qubo: the best few of those re-ranked by the cost after the fast solver; "
                   "minmax: the full range.")
@scheme_options
@click.option("--solver", type=click.Choice(list(SOLVERS)), default="fast", show_default=True,
              help="fast: batched engine on the shared Gram; neal: dwave-neal per neuron (the "
                   "paper); rtn: round to nearest; exact: brute force (tests, tiny layers).")
@click.option("--neal-reads", type=click.IntRange(min=1), default=None, help="neal num_reads [neal's default].")
@click.option("--neal-sweeps", type=click.IntRange(min=1), default=None, help="neal num_sweeps [neal's default].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the stochastic solvers.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Samples per onnxruntime run.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON here.")
@click.option("--dump-qubo", type=click.Path(file_okay=False), default=None,
              help="Write each layer's QUBOs (npz, format in onnx_qubo/exchange.py) to this directory.")
@click.option("--load-solution", type=click.Path(file_okay=False), default=None,
              help="Use the roundings <layer>.solution.npy in this --dump-qubo directory instead of solving.")
@click.option("--exclude", multiple=True, metavar="LAYER",
              help="Leave this layer in float (repeatable; names as `onnx-qubo inspect` lists them).")
@click.option("--layer-bits", multiple=True, metavar="LAYER=BITS", callback=_layer_bits,
              help="Bit width for one layer, overriding --bits (repeatable): mixed precision.")
@click.option("--bias-correction", is_flag=True,
              help="Add to each layer's output the mean error its rounding leaves (folded into its bias; "
                   "an Add after it where the bias cannot take it).")
@click.option("--format", "output_format", type=choices(Format), default="qdq", show_default=True,
              help="qdq: standard ONNX (integers -> DequantizeLinear), runs anywhere; ort: onnxruntime's fast CPU "
                   "kernels from the same codes (MatMulNBits, MatMulIntegerToFloat; QLinearConv with --activations).")
@click.option("--ort-accuracy-level", type=click.IntRange(0, 4), default=0, show_default=True,
              help="With --format ort, weight-only: 4 lets MatMulNBits quantize activations to int8 inside the kernel "
                   "(faster; the report states the output error it costs).")
@click.option("--embeddings", is_flag=True,
              help="Also quantize embedding tables (constant tables Gather reads rows of) at --bits, a scale per row "
                   "(or per --block-size block) by least squared error; with --format ort as GatherBlockQuantized.")
@click.option("--bound", is_flag=True,
              help="Certify a lower bound on each layer's optimal cost (the report's bound and gap columns).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Solve each layer's rows on N local processes (1: this process, whose solver already uses "
                   "every core through threads). Same bits for any N.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Solve on a Ray cluster at ADDRESS ('local' starts one here; pip install 'onnx-qubo[ray]').")
@click.option("--external-data", is_flag=True,
              help="Write the tensors to OUTPUT.data beside the model (always done over protobuf's 2 GB limit).")
@click.option("--max-memory", type=float, default=None, metavar="GB",
              help="Memory the run may hold (default: 60% of this machine's): the model's weights, one calibration "
                   "pass's layer statistics and one layer's solve. Statistics that do not fit are gathered in "
                   "several passes over the data.")
@click.option("--auto-scheme", is_flag=True,
              help="Per layer, the scheme with the least model-output error alone: per channel or blocks of 32, "
                   "symmetric or asymmetric (each solved once; see `onnx-qubo sensitivity`).")
@click.option("--size-budget", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MB",
              help="Model size to fit: the layers that damage the output most per byte stay at 8 bits or float "
                   "while it fits (measured alone on the calibration data).")
@click.option("--max-error", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Relative output error to reach: the most damaging layers per byte go to 8 bits or float "
                   "until the estimate (per-layer errors added in squares) is below it.")
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="Time the float and the quantized model (batch 1 and one evaluation batch) for the report.")
@click.option("--rotate", type=click.Choice(["none", "hadamard"]), default="none", show_default=True,
              help="hadamard: rotate each layer's input space first (random signs from --seed, a Hadamard transform "
                   "per block; folded into a linear producer, else run before the layer): incoherence processing.")
@click.option("--rotate-block", type=click.IntRange(min=2), default=64, show_default=True,
              help="Largest Hadamard block of --rotate (a power of two).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
def quantize(input_model, output_model, bits, calib, eval_path, scale, granularity, block_size, symmetric,
             bias_mode, activations, activation_range, sequential, solver, neal_reads, neal_sweeps, seed,
             batch_size, report_path, dump_qubo, load_solution, exclude, layer_bits, bias_correction, output_format,
             ort_accuracy_level, embeddings, bound, workers, ray_address, external_data, max_memory, auto_scheme,
             size_budget, max_error, speed, rotate, rotate_block, quiet):
    """Quantize INPUT_MODEL's dense layers and write OUTPUT_MODEL."""
    if solver != "neal" and (neal_reads or neal_sweeps):
        raise click.UsageError("--neal-reads/--neal-sweeps apply only to --solver neal")
    scheme = _scheme(granularity, block_size, symmetric, bias_mode, activations, activation_range, sequential)
    chosen = NealSolver(neal_reads, neal_sweeps) if solver == "neal" else SOLVERS[solver]()
    with failures_as_exit():
        report = api.quantize(input_model, output_model, bits=bits, calibration=calib,
                              evaluation=eval_path, scale=scale, solver=chosen, seed=seed,
                              batch_size=batch_size, report_path=report_path, dump_qubo=dump_qubo,
                              load_solution=load_solution, exclude=exclude, layer_bits=layer_bits,
                              bias_correction=bias_correction, format=output_format,
                              ort_accuracy_level=ort_accuracy_level, lower_bound=bound, workers=workers,
                              ray_address=ray_address, external_data=external_data, max_memory=max_memory,
                              speed=speed, progress=not quiet, embeddings=embeddings, auto_scheme=auto_scheme,
                              size_budget=size_budget, max_error=max_error, rotate=rotate,
                              rotate_block=rotate_block, **scheme)
    click.echo(report.to_text())


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers:  # ',' names none: an empty comparison is no answer
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'")
    return numbers


def _name_list(choices):
    def parse(ctx, param, value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise click.BadParameter(f"choose from {', '.join(choices)} (comma-separated), got '{value}'")
        return names
    return parse


@main.command()
@click.argument("model", type=click.Path())
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration .npz [default: <model stem>.calib.npz beside it].")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), default=None,
              help="Evaluation .npz with optional 'labels' [default: <model stem>.eval.npz, else calibration].")
@click.option("--bits", "bits_list", default="8,4,3,2,1", show_default=True, callback=_int_list,
              help="Bit widths, comma-separated.")
@click.option("--scales", default="minmax,mse", show_default=True, callback=_name_list([str(m) for m in ScaleMethod]),
              help="Scale methods, comma-separated.")
@click.option("--solvers", default="rtn,fast", show_default=True, callback=_name_list(list(SOLVERS)),
              help="Solvers, comma-separated (rtn is round-to-nearest).")
@scheme_options
@click.option("--samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="Cost-accuracy study: random roundings around the solution per bit width.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Write the table as Markdown.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), default=None,
              help="Write PNG plots here (needs the 'plot' extra: matplotlib).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
def compare(model, calib, eval_path, bits_list, scales, solvers, granularity, block_size, symmetric, bias_mode,
            activations, activation_range, sequential, samples, json_path, markdown_path, plots_dir, seed,
            batch_size, quiet):
    """Quantize MODEL at several bit widths, scales and solvers (one scheme); print a comparison table."""
    scheme = _scheme(granularity, block_size, symmetric, bias_mode, activations, activation_range, sequential)
    with failures_as_exit():
        for name, path in (("--json", json_path), ("--markdown", markdown_path)):
            if path is not None:
                writable_path(path, reads=inputs_read(model, calib, eval_path), what=name)
        if json_path is not None and markdown_path is not None and Path(json_path).resolve() == Path(
                markdown_path).resolve():
            raise click.UsageError("--json and --markdown name the same file; give each its own")
        if plots_dir is not None:
            from .plots import PLOT_FILES, require_matplotlib
            require_matplotlib()
            for name in PLOT_FILES if Path(plots_dir).is_dir() else ():  # checked before the long run
                writable_path(Path(plots_dir) / name, reads=inputs_read(model, calib, eval_path), what="--plots")
        result = api.compare(model, calibration=calib, evaluation=eval_path, bits=bits_list, scales=scales,
                             solvers=solvers, samples=samples, seed=seed, batch_size=batch_size,
                             progress=not quiet, **scheme)
        if json_path is not None:
            write_atomically(Path(json_path), result.to_json().encode(), "--json")
        if markdown_path is not None:
            write_atomically(Path(markdown_path), (result.to_markdown() + "\n").encode(), "--markdown")
        if plots_dir is not None:
            from .plots import write_plots
            for path in write_plots(result, Path(plots_dir), inputs_read(model, calib, eval_path)):
                click.echo(f"wrote {path}", err=True)
    click.echo(result.to_markdown())


@main.command()
@click.argument("model", type=click.Path())
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration .npz [default: <model stem>.calib.npz beside it].")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), default=None,
              help="Held-out .npz the output error is measured on [default: <model stem>.eval.npz, else calibration].")
@click.option("--bits", type=click.IntRange(MIN_BITS, MAX_BITS), default=4, show_default=True)
@click.option("--scale", type=choices(ScaleMethod), default="mse", show_default=True)
@scheme_options
@click.option("--solver", type=click.Choice(list(SOLVERS)), default="fast", show_default=True)
@click.option("--exclude", multiple=True, metavar="LAYER", help="Leave this layer out (repeatable).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
def sensitivity(model, calib, eval_path, bits, scale, granularity, block_size, symmetric, bias_mode, activations,
                activation_range, sequential, solver, exclude, json_path, seed, batch_size, quiet):
    """Each layer's contribution: MODEL's output error with only that layer quantized (one onnxruntime run
    of the evaluation data per layer), largest first; for --exclude / --layer-bits, or see --size-budget."""
    if sequential:
        raise click.UsageError("--sequential does not apply: each layer is measured alone on the float model")
    scheme = _scheme(granularity, block_size, symmetric, bias_mode, activations, activation_range, False)
    scheme.pop("sequential")
    with failures_as_exit():
        if json_path is not None:
            writable_path(json_path, reads=inputs_read(model, calib, eval_path), what="--json")
        result = api.sensitivity(model, calibration=calib, evaluation=eval_path, bits=bits, scale=scale,
                                 solver=solver, seed=seed, batch_size=batch_size, exclude=exclude,
                                 progress=not quiet, **scheme)
        if json_path is not None:
            write_atomically(Path(json_path), result.to_json().encode(), "--json")
    click.echo(result.to_markdown())


@main.command()
@click.argument("model", type=click.Path())
@verbose_option
def inspect(model):
    """List the dense layers found in MODEL and the Gemm/MatMul nodes skipped, with reasons.

    A layer's bias is named when --bias quantize/int32 can replace it ('-': none, or not one
    this layer alone reads)."""
    with failures_as_exit():
        layers, skipped = find_dense_layers(prepare(load_model(model)))
    click.echo(f"{len(layers)} dense layer(s) in {model}:")
    for layer in layers:
        n, f = layer.shape
        click.echo(f"  {layer.name:<28} {layer.label:<22} out={n:<6} in={f:<6} weight={layer.weight_name} "
                   f"bias={layer.bias_name or '-'}")
    if skipped:
        click.echo(f"{len(skipped)} skipped:")
        for node in skipped:
            click.echo(f"  {node.name:<28} {node.op_type:<8} {node.reason}")
    if not layers:
        sys.exit(1)


@main.command()
@click.argument("tokenizer", type=click.Path())
@click.argument("text", type=click.Path())
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--window", type=click.IntRange(min=2), required=True,
              help="Tokens per window (at most the model's context).")
@click.option("--windows", type=click.IntRange(min=1), required=True, help="Windows to write.")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="Tokens between window starts [default: --window, no overlap].")
@click.option("--skip", type=click.IntRange(min=0), default=0, show_default=True,
              help="Windows to leave out first: give the calibration's --windows to start the evaluation "
                   "windows right after them.")
def tokenize(tokenizer, text, output, window, windows, stride, skip):
    """Tokenize TEXT with TOKENIZER (a model folder holding tokenizer.json, or the file) and write
    OUTPUT.npz: 'input_ids' [windows, window] int64, calibration or evaluation data for a language
    model (needs pip install 'onnx-qubo[text]')."""
    from .text import write_token_windows

    with failures_as_exit():
        ids = write_token_windows(tokenizer, text, output, window=window, windows=windows, stride=stride, skip=skip)
    click.echo(f"wrote {output}: input_ids {ids.shape[0]} x {ids.shape[1]} tokens", err=True)
