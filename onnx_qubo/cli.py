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
from typing import Any, Iterator

import click

from . import api
from .config import OPTIONS, PerBlock, QuantizeConfig, granularity_of
from .core.choice import Choice
from .core.errors import Interrupted, NamesOptions, QuboError
from .core.grid import Granularity
from .core.options import ScaleMethod
from .graph.files import inputs_read, load_model, writable_path, write_atomically
from .model.discovery import find_dense_layers
from .pipeline import prepare
from .rounding.solvers import SOLVERS

FLAGS = {"calibration": "--calib", "evaluation": "--eval", "report_path": "--report", "block_size": "--block-size",
         **{name: option.flag for name, option in OPTIONS.items()}}  # API name -> flag
METAVARS = {"exclude": "LAYER", "layer_bits": "LAYER=BITS", "ray_address": "ADDRESS", "max_memory": "GB",
            "size_budget": "MB", "bits_per_weight": "BITS", "padding_mask": "INPUT"}


def flag(option: str) -> str:
    """The flag that sets an API option (a switch by its "on" form)."""
    return FLAGS.get(option, "--" + option.replace("_", "-")).split("/")[0]


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
            first = args[0]
            if not first.startswith("-") and not any(c in first for c in "./\\") and not Path(first).exists():
                ctx.fail(f"no command '{first}' (commands: {', '.join(sorted(self.commands))}) and no model file "
                         f"or folder of that name")
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


def config_option(name: str, default: object = None):
    """The click option of config option ``name`` (config.OPTIONS): its flag, type, choices, help;
    ``default`` (if given) replaces the config's default (the studies' own)."""
    option = OPTIONS[name]
    default = option.default if default is None else default
    kind: dict[str, Any] = {"help": option.help, "metavar": METAVARS.get(name)}
    flags = (option.flag, name)
    if name in ("symmetric", "bias_correction", "sequential"):  # unset (None): decided per layer or model
        return click.option(*flags, default=None, **kind)
    if name == "granularity":
        return click.option(*flags, type=choices(Granularity), default=Granularity.CHANNEL.value,
                            show_default=True, **kind)
    if isinstance(default, bool):
        if "/" in option.flag:
            return click.option(*flags, default=default, show_default=True, **kind)
        return click.option(*flags, is_flag=True, default=default, **kind)
    if isinstance(default, Choice):
        return click.option(*flags, type=choices(type(default)), default=default.value, show_default=True,
                            **kind)
    if name == "solver":
        return click.option(*flags, type=click.Choice(list(SOLVERS)), default=default, show_default=True,
                            **kind)
    if name == "layer_bits":
        return click.option(*flags, multiple=True, default=(), callback=_layer_bits, **kind)
    if name == "damping":  # a fraction, auto, or unset (None: per model)
        return click.option(*flags, type=str, default=None, callback=_damping, **kind)
    if name == "ort_accuracy_level":  # auto (None in the config) or a level
        return click.option(*flags, type=click.Choice(["auto", "0", "1", "2", "3", "4"]), default="auto",
                            show_default=True, callback=_accuracy_level, **kind)
    if isinstance(default, tuple):
        return click.option(*flags, multiple=True, default=(), **kind)
    if name in ("dump_qubo", "load_solution"):
        return click.option(*flags, type=click.Path(file_okay=False), default=None, **kind)
    scalar = {"int": int, "float": float}.get(type(default).__name__) or (
        float if name in ("max_memory", "size_budget", "bits_per_weight", "max_error", "small_layers")
        else int if name.startswith("neal") or name == "head_bits" else str)
    return click.option(*flags, type=scalar, default=default, show_default=default is not None, **kind)


def _damping(ctx: click.Context, param: click.Parameter, value: str | None) -> float | str | None:
    if value is None:
        return None  # unset: per model (api._resolved)
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor auto") from None


def _accuracy_level(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    return None if value == "auto" else int(value)


def block_size_option(command):
    return click.option("--block-size", "block_size", type=int, default=None,
                        help="Inputs per scale block (with --granularity block; e.g. 32).")(command)


def config_options(names: list[str], **defaults: object):
    """The flags of config options ``names`` (with ``--block-size`` after ``--granularity``)."""
    def decorate(command):
        for name in reversed(names):
            if name == "granularity":
                command = block_size_option(command)
            command = config_option(name, defaults.get(name))(command)
        return command
    return decorate


SCHEME = ["granularity", "symmetric", "float_zero_points", "bias", "bias_correction", "activations", "activation_range",
          "sequential", "padding_mask"]


def quantize_config(ctx: click.Context, given: dict, config_path: str | None) -> QuantizeConfig:
    """The config of a quantize command: ``--config FILE`` (or the defaults), with the flags given
    on the command line over it."""
    base = QuantizeConfig() if config_path is None else QuantizeConfig.load(config_path)
    flat = base.flat()
    on_command_line = {name for name in [*OPTIONS, "block_size"]
                       if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    flat.update({name: given[name] for name in on_command_line & set(OPTIONS) - {"granularity"}})
    if on_command_line & {"granularity", "block_size"}:
        current = base.weights.granularity
        kind = given["granularity"] if "granularity" in on_command_line else current.kind.value
        size = given["block_size"] if "block_size" in on_command_line else (
            current.size if isinstance(current, PerBlock) and kind == "block" else None)
        flat["granularity"] = granularity_of(kind, size)
    return QuantizeConfig.from_flat(flat)


def _scheme(given: dict) -> dict:
    """The scheme flags as keyword arguments of the studies (compare, sensitivity)."""
    return {name: given[name] for name in [*SCHEME, "block_size"] if name in given}


@click.group(cls=_DefaultToQuantize, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-qubo")
def main():
    """Quantize the dense layers of an ONNX model to low-bit integers by QUBO rounding.

    \b
    onnx-qubo model.onnx out.onnx --bits 2      (same as: onnx-qubo quantize ...)
    onnx-qubo compare model.onnx --samples 30   (bit widths x scales x solvers)
    onnx-qubo inspect model.onnx
    """


# every config option, in --help order
QUANTIZE = ["bits", "scale", *SCHEME, "solver", "effort", "neal_reads", "neal_sweeps", "seed", "batch_size",
            "dump_qubo", "load_solution", "exclude", "layer_bits", "head_bits", "small_layers", "format",
            "ort_accuracy_level", "embeddings", "lower_bound", "rotate", "rotate_block", "rotate_convs",
            "rotate_residual", "damping", "levels", "workers", "ray_address", "external_data", "pack_codes",
            "max_memory", "auto_scheme", "size_budget", "bits_per_weight", "max_error"]


@main.command()
@click.argument("input_model", type=click.Path())
@click.argument("output_model", type=click.Path())
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Options from this JSON file (as --save-config writes it); flags given here override it.")
@click.option("--save-config", type=click.Path(dir_okay=False), default=None,
              help="Also write the options of this run as JSON here (for --config).")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration .npz keyed by input name [default: <model stem>.calib.npz beside it].")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), default=None,
              help="Evaluation .npz (inputs + optional 'labels') [default: <model stem>.eval.npz "
                   "beside it, else the calibration data].")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON here.")
@config_options(QUANTIZE)
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="Time the float and the quantized model (batch 1 and one evaluation batch) for the report.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
@click.pass_context
def quantize(ctx, input_model, output_model, config_path, save_config, calib, eval_path, report_path, speed, quiet,
             **given):
    """Quantize INPUT_MODEL's dense layers and write OUTPUT_MODEL."""
    with failures_as_exit():
        config = quantize_config(ctx, given, config_path)
        if save_config is not None:
            reads = inputs_read(input_model, calib, eval_path, config.rounding.load_solution)
            saved_config = writable_path(save_config, reads=reads, what="--save-config")
            if saved_config.resolve() in {Path(p).resolve() for p in (output_model, report_path) if p is not None}:
                raise click.UsageError("--save-config names an output of the run; give it its own file")
        result = api.run(input_model, output_model, config, calibration=calib, evaluation=eval_path,
                         report_path=report_path, speed=speed, progress=not quiet)
        if save_config is not None:
            write_atomically(saved_config, config.to_json().encode(), "--save-config")
    click.echo(result.report.to_text())


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
@click.option("--scales", default="minmax,mse", show_default=True,
              callback=_name_list([str(m) for m in ScaleMethod if m != ScaleMethod.AUTO]),
              help="Scale methods, comma-separated.")
@click.option("--solvers", default="rtn,fast", show_default=True, callback=_name_list(list(SOLVERS)),
              help="Solvers, comma-separated (rtn is round-to-nearest).")
@config_options(SCHEME)
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
def compare(model, calib, eval_path, bits_list, scales, solvers, samples, json_path, markdown_path, plots_dir, seed,
            batch_size, quiet, **given):
    """Quantize MODEL at several bit widths, scales and solvers (one scheme); print a comparison table.
    No rotation (a language model's quantize default) here; damping as quantize damps a model other than a
    language model (auto below 4 bits), none for a language model."""
    scheme = _scheme(given)
    with failures_as_exit():
        for name, path in (("--json", json_path), ("--markdown", markdown_path)):
            if path is not None:
                writable_path(path, reads=inputs_read(model, calib, eval_path), what=name)
        if json_path is not None and markdown_path is not None and Path(json_path).resolve() == Path(
                markdown_path).resolve():
            raise click.UsageError("--json and --markdown name the same file; give each its own")
        if plots_dir is not None:
            from .studies.plots import PLOT_FILES, require_matplotlib
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
            from .studies.plots import write_plots
            for path in write_plots(result, Path(plots_dir), inputs_read(model, calib, eval_path)):
                click.echo(f"wrote {path}", err=True)
    click.echo(result.to_markdown())


@main.command()
@click.argument("model", type=click.Path())
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration .npz [default: <model stem>.calib.npz beside it].")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), default=None,
              help="Held-out .npz the output error is measured on [default: <model stem>.eval.npz, else calibration].")
@config_options(["bits", "scale", *SCHEME, "solver", "exclude"], bits=4)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
def sensitivity(model, calib, eval_path, bits, scale, solver, exclude, json_path, seed, batch_size, quiet, **given):
    """Each layer's contribution: MODEL's output error with only that layer quantized (one onnxruntime run
    of the evaluation data per layer), largest first; for --exclude / --layer-bits, or see --size-budget.
    --scale auto is mse here, with no rotation (a language model's quantize default); damping as quantize damps a
    model other than a language model (auto below 4 bits), none for a language model."""
    if given.pop("sequential"):
        raise click.UsageError("--sequential does not apply: each layer is measured alone on the float model")
    scheme = _scheme(given)
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
    from .calibration.text import write_token_windows

    with failures_as_exit():
        ids = write_token_windows(tokenizer, text, output, window=window, windows=windows, stride=stride, skip=skip)
    click.echo(f"wrote {output}: input_ids {ids.shape[0]} x {ids.shape[1]} tokens", err=True)
