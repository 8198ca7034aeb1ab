"""The per-layer plan: the options resolved against the model's layers, once, at the top.

Every stage below receives a ``LayerPlan`` (or the ``Plan``), never the whole option set:
what a layer's scheme is, how its scales are chosen, what happens to its bias, which solver
rounds it. Checks that need the layers (names in ``layer_bits``) happen here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection

import onnx

from .backends import kernels, portable
from .backends.kernels import Format
from .config import SMALL_BITS, QuantizeConfig
from .core.errors import OptionError
from .core.grid import Scheme, level_digits
from .core.options import Activations, BiasMode, Damping, RangeMethod, ScaleMethod
from .core.types import DenseLayer
from .rounding import exchange
from .rounding.solvers import Solver


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """Everything decided for one layer before its statistics are known."""

    layer: DenseLayer
    scheme: Scheme
    scale: ScaleMethod
    bias: BiasMode  # FLOAT where the layer has no bias it alone holds as one value per output
    bias_correction: bool
    lower_bound: bool
    solver: Solver
    seed: int
    levels: int  # grid points each weight may round to (at most the grid's)
    damping: Damping  # ridge on the Gram's diagonal in the objective, a fraction of its mean (0: none), or auto
    stem: str  # file-system-safe name of its exchange files
    workers: int  # local processes for its rows (1: in this process)
    ray_address: str | None  # or a Ray cluster
    other_grid: Scheme | None = None  # the asymmetric grid, which prepare_layer tries beside ``scheme``

    def with_grid(self, scheme: Scheme) -> LayerPlan:
        """This plan with the grid chosen for it."""
        return replace(self, scheme=scheme, other_grid=None)

    @property
    def bias_is_variable(self) -> bool:
        return self.bias == BiasMode.QUANTIZE

    @property
    def variables(self) -> int:
        """Binary variables per neuron: for each weight, and the bias when it is one, one per
        digit of its choice among ``levels`` grid points."""
        return (self.layer.shape[1] + self.bias_is_variable) * len(level_digits(self.levels))


@dataclass(frozen=True, eq=False)
class Plan:
    layers: list[LayerPlan]
    activations: Activations
    activation_range: RangeMethod
    sequential: bool
    dump_dir: Path | None
    solution_dir: Path | None
    description: str  # the scheme in words, for reports
    format: Format
    accuracy_level: int
    pack_codes: bool  # codes narrower than their type written at their width (passes/packed_codes.py)


def make_plan(config: QuantizeConfig, layers: list[DenseLayer], heads: Collection[str] = (),
              small: Collection[str] = ()) -> Plan:
    """Resolve ``config`` for each of ``layers`` (graph order); ``heads``: the output layers
    (discovery.output_layers), at ``--head-bits``, and ``small`` (``small_layers``), at
    ``SMALL_BITS``, unless ``--layer-bits`` names them. The studies and the automatic choice give
    none: they measure every layer at the widths they try."""
    rounding = config.rounding
    layer_bits = {**{name: config.weights.output_bits for name in layers_at_head_bits(config, layers, heads)},
                  **{name: SMALL_BITS for name in small}, **config.automatic.layer_bits}
    unknown = set(layer_bits) - {layer.owner for layer in layers}
    if unknown:
        raise OptionError(f"{{layer_bits}} names no quantized dense layer: {', '.join(sorted(unknown))} "
                          "(onnx-qubo inspect lists the layers)", "layer_bits")
    half = next((layer for layer in layers if layer.float_type != onnx.TensorProto.FLOAT), None)
    if half is not None and config.activations.quantized:
        raise OptionError(f"{{activations}} {config.activations.dtype} quantizes float32 inputs; layer '{half.name}' "
                          "computes in float16 (a half-precision model): use {activations} none", "activations")
    stems = exchange.file_stems([layer.name for layer in layers])
    solver = rounding.make_solver()
    grids = [[replace(s, scale_type=layer.float_type) for s in _grids(config, layer, layer_bits.get(layer.owner))]
             for layer in layers]
    planned = [
        LayerPlan(layer=layer, scheme=grid[0], other_grid=grid[1] if len(grid) > 1 else None,
                  scale=ScaleMethod.MSE if rounding.scale == ScaleMethod.AUTO else rounding.scale,
                  bias=rounding.bias if layer.bias is not None else BiasMode.FLOAT,
                  bias_correction=_bias_correction(config, layer), lower_bound=rounding.lower_bound,
                  solver=solver, seed=rounding.seed, levels=min(rounding.levels, 2 ** grid[0].bits),
                  damping=rounding.damping or 0.0, stem=stem,
                  workers=config.execution.workers, ray_address=config.execution.ray_address)
        for layer, grid, stem in zip(layers, grids, stems)]
    # sequential unset: quantize_model resolves it per model first; the studies measure on the float inputs
    # (scale auto and damping unset: api.quantize resolves them per model; elsewhere mse and none)
    return Plan(planned, config.activations.dtype, config.activations.range, bool(rounding.sequential),
                _path(rounding.dump_qubo), _path(rounding.load_solution), config.describe(), config.output.format,
                config.output.ort_accuracy_level or 0,  # auto is resolved by api.quantize; the studies write nothing
                config.output.pack_codes)


def layers_at_head_bits(config: QuantizeConfig, layers: list[DenseLayer], heads: Collection[str]) -> list[str]:
    """The output layers ``--head-bits`` applies to: ``heads``, unless the width is the default and
    they are every layer (a one-layer model gets the ``--bits`` it was asked for)."""
    if config.weights.head_bits is None and {layer.owner for layer in layers} <= set(heads):
        return []
    return list(heads)


def small_layers(config: QuantizeConfig, layers: list[DenseLayer], heads: Collection[str]) -> list[str]:
    """The layers ``--small-layers`` keeps at ``SMALL_BITS`` (below ``--bits``' width: none): the
    smallest by weight count, output layers aside, while together they hold at most its share of
    the weights; layers of one size are taken all or none, so no tie is broken by graph order.
    Those ``--layer-bits`` names keep their width and are left out."""
    share = config.weights.small_share if config.weights.bits < SMALL_BITS else 0.0
    sizes: dict[str, int] = {}
    for layer in layers:  # a grouped Conv's groups and a recurrent node's directions are one layer
        sizes[layer.owner] = sizes.get(layer.owner, 0) + layer.shape[0] * layer.shape[1]
    budget, taken = share * sum(sizes.values()), []
    for size in sorted({size for name, size in sizes.items() if name not in heads}):
        names = [name for name, n in sizes.items() if n == size and name not in heads]
        budget -= size * len(names)
        if budget < 0:
            break
        taken += names
    return [name for name in taken if name not in config.automatic.layer_bits]


def _grids(config: QuantizeConfig, layer: DenseLayer, bits: int | None) -> tuple[Scheme, ...]:
    """The grids ``layer`` may get: the requested one, or (unset) those onnxruntime loads, and
    only the signed one for a Conv that may run as QLinearConv (one weight zero point for all
    channels: the kernel is worth more than the zero points); integer zero points where its form
    cannot write float ones."""
    quantized = config.activations.quantized
    grids = config.weights.grids(bits)
    if not portable.takes_float_zero_points(layer):  # its form writes integer zero points only
        grids = tuple(replace(s, float_zero_point=False) for s in grids)
    if len(grids) == 1:
        return grids
    if kernels.needs_output_range(layer, config.output.format, quantized):
        return grids[:1]
    return tuple(s for s in grids if not portable.scheme_refusal(s, quantized))


def _bias_correction(config: QuantizeConfig, layer: DenseLayer) -> bool:
    """The requested correction, or (unset) where it costs nothing at run time: a layer with a
    bias to fold it into (float or INT32; not one quantized as a QUBO variable)."""
    rounding = config.rounding
    if rounding.bias_correction is not None:
        return rounding.bias_correction
    return layer.bias is not None and rounding.bias != BiasMode.QUANTIZE


def _path(text: str | None) -> Path | None:
    return None if text is None else Path(text)
