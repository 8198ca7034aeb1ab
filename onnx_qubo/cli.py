"""Command line: ``onnx-qubo IN.onnx OUT.onnx --bits 2`` and ``onnx-qubo inspect IN.onnx``.

Only parses flags, calls the Python API and prints; the work lives in api.py and below.
"""

from __future__ import annotations

import sys

import click

from . import api
from .discovery import find_dense_layers
from .errors import QuboInputError
from .files import load_model
from .grid import MAX_BITS, MIN_BITS
from .scales import SCALE_METHODS
from .solvers import SOLVERS, NealSolver


class _DefaultToQuantize(click.Group):
    """``onnx-qubo IN OUT ...`` means ``onnx-qubo quantize IN OUT ...``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["quantize", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToQuantize, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-qubo")
def main():
    """Quantize the dense layers of an ONNX model to low-bit integers by QUBO rounding.

    \b
    onnx-qubo model.onnx out.onnx --bits 2      (same as: onnx-qubo quantize ...)
    onnx-qubo inspect model.onnx
    """


@main.command()
@click.argument("input_model", type=click.Path(dir_okay=False))
@click.argument("output_model", type=click.Path(dir_okay=False))
@click.option("--bits", type=click.IntRange(MIN_BITS, MAX_BITS), default=2, show_default=True,
              help="Weight bit width (INT2 storage for 1-2, INT4 for 3-4, INT8 for 5-8).")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration .npz keyed by input name [default: <model stem>.calib.npz beside it].")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), default=None,
              help="Evaluation .npz (inputs + optional 'labels') [default: <model stem>.eval.npz "
                   "beside it, else the calibration data].")
@click.option("--scale", type=click.Choice(SCALE_METHODS), default="mse", show_default=True,
              help="mse: per-channel clipping ratio searched on the QUBO cost; minmax: max-abs.")
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
@click.option("--quiet", is_flag=True, help="No progress bars.")
def quantize(input_model, output_model, bits, calib, eval_path, scale, solver, neal_reads,
             neal_sweeps, seed, batch_size, report_path, dump_qubo, load_solution, quiet):
    """Quantize INPUT_MODEL's dense layers and write OUTPUT_MODEL."""
    if solver != "neal" and (neal_reads or neal_sweeps):
        raise click.UsageError("--neal-reads/--neal-sweeps apply only to --solver neal")
    chosen = NealSolver(neal_reads, neal_sweeps) if solver == "neal" else SOLVERS[solver]()
    try:
        report = api.quantize(input_model, output_model, bits=bits, calibration=calib,
                              evaluation=eval_path, scale=scale, solver=chosen, seed=seed,
                              batch_size=batch_size, report_path=report_path, dump_qubo=dump_qubo,
                              load_solution=load_solution, progress=not quiet)
    except QuboInputError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(report.to_text())


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
def inspect(model):
    """List the dense layers found in MODEL and the Gemm/MatMul nodes skipped, with reasons."""
    try:
        layers, skipped = find_dense_layers(load_model(model))
    except QuboInputError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{len(layers)} dense layer(s) in {model}:")
    for layer in layers:
        n, f = layer.shape
        click.echo(f"  {layer.name:<28} {layer.form:<22} out={n:<6} in={f:<6} weight={layer.weight_name}")
    if skipped:
        click.echo(f"{len(skipped)} skipped:")
        for node in skipped:
            click.echo(f"  {node.name:<28} {node.op_type:<8} {node.reason}")
    if not layers:
        sys.exit(1)
