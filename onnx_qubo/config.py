"""The configuration of a quantization run: one typed, frozen record per concern, saved as JSON.

Every option is declared once, here: its type, default, check, help text and (where it is not
``--name``) its flag. ``QuantizeConfig`` groups the sections; its construction checks each value
and every combination that does not need the model (``plan.make_plan`` resolves the rest
against the layers). Errors name options by their flat name (``bits``, ``ort_accuracy_level``:
the keyword of ``QuantizeConfig.from_flat``), which the CLI shows as its flags and ``from_json``
as the file's keys (``weights.bits``). The CLI's quantize flags are generated from ``OPTIONS``.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

from .backends import portable
from .backends.kernels import Format, check_accuracy_level, check_format
from .calibration.activations import PERCENTILE
from .core.choice import Choice, parse_choice
from .core.errors import OptionError
from .core.grid import Granularity, Scheme
from .core.options import (
    AUTO,
    MAX_GB,
    Activations,
    BiasMode,
    Damping,
    RangeMethod,
    Rotation,
    ScaleMethod,
    check_bits,
    check_integer,
    check_positive,
)
from .rounding.solvers import SOLVERS, FastSolver, NealSolver, Solver


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (row)."""

    kind: ClassVar[Granularity] = Granularity.CHANNEL
    size: ClassVar[int] = 0


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole weight."""

    kind: ClassVar[Granularity] = Granularity.TENSOR
    size: ClassVar[int] = 0


@dataclass(frozen=True)
class PerBlock:
    """One scale per run of ``size`` inputs within a row (DequantizeLinear's block_size)."""

    size: int
    kind: ClassVar[Granularity] = Granularity.BLOCK

    def __post_init__(self) -> None:
        check_integer(self.size, "block_size", minimum=1)


WeightGranularity = PerChannel | PerTensor | PerBlock


def granularity_of(kind: object, block_size: object = None) -> WeightGranularity:
    """The granularity object from its name (and a block size, only with ``block``)."""
    if isinstance(kind, (PerChannel, PerTensor, PerBlock)):
        return kind
    chosen = parse_choice(Granularity, kind, "granularity")
    blocks = chosen == Granularity.BLOCK
    if blocks != (block_size is not None and (blocks or block_size != 0)):  # 0: no block size, as in a Scheme
        raise OptionError("{block_size} goes with {granularity} block, and {granularity} block needs it",
                          "granularity", "block_size")
    if chosen == Granularity.BLOCK:
        return PerBlock(check_integer(block_size, "block_size", minimum=1))
    return PerChannel() if chosen == Granularity.CHANNEL else PerTensor()


def _option(default: Any = None, help: str = "", flag: str | None = None, name: str | None = None,
            factory: Any = None) -> Any:
    """A config field with what the CLI needs: its help, its flag if not ``--name``, and its flat
    name if not the field's."""
    metadata = {"help": help, "flag": flag, "name": name}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_bool(value: object, option: str) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{{{option}}} must be true or false, got {value!r}", option)
    return value


def _check_text(value: object, option: str) -> str | None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise OptionError(f"{{{option}}} must be a string, got {value!r}", option)
    return None if value is None else os.fspath(value)


class _Section:
    """A config section: ``__post_init__`` checks and normalizes each field by its declared type."""

    def __post_init__(self) -> None:
        for item in fields(self):  # type: ignore[arg-type]
            name = item.metadata.get("name") or item.name
            object.__setattr__(self, item.name, _checked(item.type, getattr(self, item.name), name))


def _checked(kind: object, value: object, option: str) -> object:
    """``value`` checked against the annotation ``kind`` (a string: ``from __future__``)."""
    optional = isinstance(kind, str) and kind.endswith(" | None")
    kind = kind.removesuffix(" | None") if isinstance(kind, str) else kind
    if optional and value is None:
        return None
    checks: dict[str, Callable[[Any, str], object]] = {
              "bool": _check_bool, "str": _check_text, "int": check_integer, "float": check_positive,
              "Fraction": _check_fraction, "Damping": _check_damping,
              "ScaleMethod": lambda v, o: parse_choice(ScaleMethod, v, o),
              "BiasMode": lambda v, o: parse_choice(BiasMode, v, o),
              "Activations": lambda v, o: parse_choice(Activations, v, o),
              "RangeMethod": lambda v, o: parse_choice(RangeMethod, v, o),
              "Rotation": lambda v, o: parse_choice(Rotation, v, o),
              "Format": lambda v, o: parse_choice(Format, v, o),
              "WeightGranularity": lambda v, o: granularity_of(v),
              "tuple[str, ...]": _check_names, "Mapping[str, int]": _check_layer_bits}
    return checks[str(kind)](value, option)


Fraction = float  # an option's annotation for a number of at least 0 (``float`` options are above 0)


def _check_fraction(value: object, option: str) -> float:
    """A finite number of at least 0: 0 itself, else what ``check_positive`` takes."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0:
        return 0.0
    amount = check_positive(value, option, what="a number of at least 0")
    assert amount is not None  # None is an unset option, which _checked returns before
    return amount


def _check_damping(value: object, option: str) -> Damping:
    """``auto``, or a fraction as ``_check_fraction`` takes it."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    return _check_fraction(value, option)


def default_damping(language_model: bool, bits: int) -> Damping:
    """``--damping`` unset: 0.01 for a language model (measured on SmolLM2-135M: docs/llm.md), ``auto``
    below HEAD_BITS bits for other models (docs/results.md, "Automatic damping"), else none."""
    if language_model:
        return LM_DAMPING
    return AUTO if bits < HEAD_BITS else 0.0


def _check_names(value: object, option: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):  # type: ignore[attr-defined]
        raise OptionError(f"{{{option}}} must be a list of layer names, got {value!r}", option)
    return tuple(value)  # type: ignore[arg-type]


def _check_layer_bits(value: object, option: str) -> dict[str, int]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise OptionError(f"{{{option}}} must map layer names to bit widths, got {value!r}", option)
    return {name: check_bits(bits, option) for name, bits in value.items()}


HEAD_BITS = 4  # the output layers' width below it, unless --head-bits says otherwise
SMALL_BITS = 8  # the width --small-layers keeps layers at
SMALL_SHARE = 0.05  # --small-layers below HEAD_BITS bits, unless given
LM_DAMPING = 0.01  # --damping's value for a language model (GPTQ's damp_percent 1)


@dataclass(frozen=True)
class WeightConfig(_Section):
    """How weights are stored: bit width, scale groups, zero points."""

    bits: int = _option(2, "Weight bit width (INT2/UINT2 storage for 1-2, INT4/UINT4 for 3-4, INT8/UINT8 for 5-8).")
    granularity: WeightGranularity = _option(
        factory=PerChannel, help="Weights sharing one scale: each output channel, the whole tensor, or blocks of "
                                 "--block-size inputs within a channel (DequantizeLinear block_size, opset 21).")
    symmetric: bool | None = _option(None, "Signed grid with zero point 0 (INT2/INT4/INT8), or unsigned grid with "
                                           "an integer zero point per scale (UINT2/UINT4/UINT8). Unset (the "
                                           "default): per layer, the one whose round-to-nearest output error "
                                           "is lower.",
                                     flag="--symmetric/--asymmetric")
    float_zero_points: bool = _option(False, "Asymmetric grids store their zero points as floats (the scale's "
                                             "type): each group is scale x code + any offset, as MatMulNBits takes "
                                             "it (GGUF Q4_1, HQQ). Dense MatMul/Gemm layers only (the others keep "
                                             "integer zero points); the Gemm after DequantizeLinear then loses "
                                             "the offsets' share of its output. Weight-only.")
    head_bits: int | None = _option(None, "Bit width of the output layers (those whose result is a model output up "
                                          "to shape and element-wise steps: a language model's head, a classifier's "
                                          "last layer) and of the embedding tables (--embeddings). Unset (the "
                                          f"default): {HEAD_BITS} where --bits is below {HEAD_BITS}, as llama.cpp's "
                                          "K-quants and most low-bit methods keep the head wider, else --bits.")
    small_layers: Fraction | None = _option(None, f"Keep the smallest layers at {SMALL_BITS} bits while together they "
                                                  "hold at most this share of the quantized weights (smallest first, "
                                                  "layers of one size all or none, output layers aside): a Conv "
                                                  "network's first and depthwise Convs carry much of its low-bit error "
                                                  "in a few hundredths of its weights. Unset (the default): "
                                                  f"{SMALL_SHARE:g} where --bits is below {HEAD_BITS} (not for a "
                                                  "language model), else 0 (off).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits(self.bits)
        if self.float_zero_points and self.symmetric:
            raise OptionError("{float_zero_points} are the asymmetric grid's: drop {symmetric}", "float_zero_points",
                              "symmetric")
        if self.head_bits is not None:
            check_bits(self.head_bits, "head_bits")
        if self.small_layers is not None and self.small_layers > 1:
            raise OptionError(f"{{small_layers}} is a share of the weights, at most 1, got {self.small_layers:g}",
                              "small_layers")

    @property
    def output_bits(self) -> int:
        """The output layers' bit width (``head_bits``, resolved)."""
        if self.head_bits is not None:
            return self.head_bits
        return max(self.bits, HEAD_BITS)

    @property
    def small_share(self) -> float:
        """The share of the weights ``small_layers`` keeps at ``SMALL_BITS`` (resolved)."""
        if self.small_layers is not None:
            return self.small_layers
        return SMALL_SHARE if self.bits < HEAD_BITS else 0.0

    def scheme(self, bits: int | None = None) -> Scheme:
        """The grid scheme at ``bits`` (default: ``self.bits``); the symmetric one where the grid
        is chosen per layer (``grids`` lists both)."""
        return self.grids(bits)[0]

    def grids(self, bits: int | None = None) -> tuple[Scheme, ...]:
        """The schemes at ``bits`` a layer may get: the requested grid, or (``symmetric`` None)
        the symmetric and the asymmetric one, chosen per layer (layer.py)."""
        bits = self.bits if bits is None else bits
        kinds = (True, False) if self.symmetric is None else (self.symmetric,)
        return tuple(Scheme(bits, self.granularity.kind, self.granularity.size, s,
                            float_zero_point=self.float_zero_points and not s) for s in kinds)


LEVELS = (2, 3, 4)  # grid points a weight may round to (--levels)


@dataclass(frozen=True)
class RoundingConfig(_Section):
    """How each layer's rounding is chosen."""

    scale: ScaleMethod = _option(ScaleMethod.AUTO, "mse: clipping ratio per scale group searched on the QUBO cost of "
                                 "round-to-nearest; qubo: the best few of those re-ranked by the cost after the fast "
                                 "solver; fit: mse's, then refitted by least squares to the rounded weights and solved "
                                 "again (twice; per row the better); minmax: the full range; auto: fit for a "
                                 "transformer (a language model, or layers reading a LayerNorm/RMSNorm) with float32 "
                                 "weights below 4 bits, else mse.")
    solver: str = _option("fast", "fast: batched engine on the shared Gram; neal: dwave-neal per neuron (the paper); "
                                  "rtn: round to nearest; exact: brute force (tests, tiny layers).")
    seed: int = _option(0, "Seed for the stochastic solvers.")
    effort: int = _option(1, "Search effort of the fast solver: N times its tabu search's round length, rounds and "
                             "patience, for lower layer costs (the same bits for the same N; on an OCR model's "
                             "layers 6.6x the solve time at 4, 19x at 8).")
    neal_reads: int | None = _option(None, "neal num_reads [neal's default].")
    neal_sweeps: int | None = _option(None, "neal num_sweeps [neal's default].")
    bias: BiasMode = _option(BiasMode.FLOAT, "float: keep it; quantize: a variable of each neuron's QUBO at the "
                             "weights' bit width (the paper); int32: input scale x weight scale (needs --activations).")
    bias_correction: bool | None = _option(
        None, "Add to each layer's output the mean error its rounding leaves (folded into its bias; an Add after it "
              "where the bias cannot take it). Unset (the default): on for the layers that have a bias to fold it "
              "into.",
        flag="--bias-correction/--no-bias-correction")
    sequential: bool | None = _option(
        None, "Calibrate each layer on the outputs of the already quantized earlier layers (target: the float "
              "model's outputs). Unset (the default): on where a Conv layer is fed by another quantized layer.",
        flag="--sequential/--no-sequential")
    padding_mask: str = _option(
        AUTO, "Calibration input whose zeros mark padded positions ([batch, sequence], as a tokenizer's "
              "attention_mask): the layers whose inputs are per position leave them out of their statistics (a model "
              "given the mask never lets them reach its output). auto: attention_mask (or TensorFlow's input_mask) "
              "where the model takes one and the calibration data pads; none: every position counts.")
    lower_bound: bool = _option(False, "Certify a lower bound on each layer's optimal cost (the report's bound and "
                                       "gap columns).", flag="--bound")
    dump_qubo: str | None = _option(None, "Write each layer's QUBOs (npz, format in onnx_qubo/rounding/exchange.py) "
                                          "to this directory.")
    load_solution: str | None = _option(None, "Use the roundings <layer>.solution.npy in this --dump-qubo directory "
                                              "instead of solving.")
    rotate: Rotation = _option(Rotation.AUTO, "hadamard: rotate each layer's input space first (random signs from "
                               "--seed, a Hadamard transform per block; folded into a linear producer, else run "
                               "before the layer): incoherence processing; whole: one Hadamard transform of the whole "
                               "width (Paley's kron Sylvester's: two small MatMuls), else blocks; auto: whole for "
                               "a transformer (a language model, or layers reading a LayerNorm/RMSNorm) with float32 "
                               "weights below 4 bits, else none.")
    rotate_block: int = _option(64, "Largest Hadamard block of --rotate (a power of two); with whole, the largest "
                                    "Sylvester factor.")
    rotate_convs: bool = _option(False, "With --rotate, also rotate the input channels of Conv layers (group 1; "
                                        "depthwise and grouped ones stay): an online transform on the channel axis "
                                        "before them, never folded.", flag="--rotate-convs/--no-rotate-convs")
    rotate_residual: bool = _option(False, "With --rotate, turn a decoder's residual stream between RMS norms as one "
                                           "(QuaRot): its writers' output spaces rotate and each norm's gain moves "
                                           "into the layers reading it, which then need no online transform (faster "
                                           "decoding; measured worse rounding at 3 bits, docs/llm.md).",
                                    flag="--rotate-residual/--no-rotate-residual")
    damping: Damping | None = _option(
        None, "Ridge added to each layer's input Gram matrix in the objective the scales and rounding minimize, as a "
              "fraction of its mean diagonal (GPTQ's damp_percent / 100): steadies them against calibration's "
              "sampling noise; the reported costs stay the undamped output error. auto: per layer, Ledoit and "
              "Wolf's shrinkage from how much the Gram matrix varies between calibration samples. Unset (the "
              "default): 0.01 for a language model; auto below 4 bits for other models, else 0.")
    levels: int = _option(2, "Grid points each weight may round to: 2 (floor or ceiling, the paper), 3 or 4 "
                             "(around its value; at 2 bits, 4 is the whole grid), encoded exactly in the QUBO with "
                             "1-2 binary variables per weight.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotate_block < 2 or self.rotate_block & (self.rotate_block - 1):
            raise OptionError(f"{{rotate_block}} must be a power of two, at least 2, got {self.rotate_block}",
                              "rotate_block")
        for name in ("rotate_convs", "rotate_residual"):
            if getattr(self, name) and self.rotate == Rotation.NONE:
                raise OptionError(f"{{{name}}} rotates with {{rotate}}: give --rotate hadamard or whole", name,
                                  "rotate")
        if self.solver not in SOLVERS:
            raise OptionError(f"{{solver}} must be one of {', '.join(SOLVERS)}, got {self.solver!r}", "solver")
        if check_integer(self.levels, "levels") not in LEVELS:
            raise OptionError(f"{{levels}} must be one of {', '.join(map(str, LEVELS))}, got {self.levels}", "levels")
        if check_integer(self.effort, "effort", minimum=1) != 1 and self.solver != "fast":
            raise OptionError("{effort} applies only to {solver} fast", "effort", "solver")
        for name in ("neal_reads", "neal_sweeps"):
            if getattr(self, name) is not None:
                check_integer(getattr(self, name), name, minimum=1)
                if self.solver != "neal":
                    raise OptionError(f"{{{name}}} applies only to {{solver}} neal", name, "solver")

    @property
    def solver_text(self) -> str:
        """The solver as the report names it: with its effort where that is not the default."""
        return f"{self.solver} (effort {self.effort})" if self.effort != 1 else self.solver

    def make_solver(self) -> Solver:
        """The solver object this config names."""
        if self.solver == "neal":
            return NealSolver(self.neal_reads, self.neal_sweeps)
        if self.solver == "fast":
            return FastSolver(effort=self.effort)
        return SOLVERS[self.solver]()


@dataclass(frozen=True)
class ActivationConfig(_Section):
    """Whether and how each layer's input is quantized."""

    dtype: Activations = _option(Activations.NONE, "Quantize each layer's input per tensor (QuantizeLinear/"
                                 "DequantizeLinear); the QUBO then sees the quantized inputs.", name="activations")
    range: RangeMethod = _option(RangeMethod.MINMAX, f"Input ranges: observed min/max, or the {PERCENTILE}% percentile "
                                 "at both ends.", name="activation_range")

    @property
    def quantized(self) -> bool:
        return self.dtype != Activations.NONE


@dataclass(frozen=True)
class OutputConfig(_Section):
    """What the written model looks like."""

    format: Format = _option(Format.QDQ, "qdq: standard ONNX (integers -> DequantizeLinear), runs anywhere; ort: "
                             "onnxruntime's fast CPU kernels from the same codes (MatMulNBits, MatMulIntegerToFloat; "
                             "QLinearConv with --activations).")
    ort_accuracy_level: int | None = _option(None, "With --format ort, weight-only: 4 lets MatMulNBits quantize "
                                                "activations to int8 inside the kernel (faster; the report states the "
                                                "output error it costs), 0 computes in float; auto: 4 for a language "
                                                "model (as onnxruntime-genai's builder writes), 8-bit weights, or "
                                                "2-bit ones in blocks its 2-bit kernel takes (32-128, or per "
                                                "channel), else 0.")
    embeddings: bool = _option(False, "Also quantize embedding tables (constant tables Gather reads rows of) at "
                                      "--head-bits (4 below 4 bits, like the head: a narrower table costs a "
                                      "language model much, docs/llm.md), a scale per row (or per --block-size "
                                      "block) by least squared error; with --format ort as GatherBlockQuantized.")
    external_data: bool = _option(False, "Write the tensors to OUTPUT.data beside the model (always done over "
                                         "protobuf's 2 GB limit).")
    pack_codes: bool = _option(False, "Write DequantizeLinear's codes at their own width where ONNX has no type "
                                      "that narrow (1, 3, 5-7 bits: 3-bit codes a quarter smaller than in INT4), "
                                      "unpacked by integer operators that onnxruntime folds into the INT4/INT8 "
                                      "tensor when it loads the model (a smaller file; loading takes longer, and "
                                      "the process more memory: docs/results.md, \"Codes packed at their width\").",
                               flag="--pack-codes/--no-pack-codes")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ort_accuracy_level is not None:
            check_accuracy_level(self.ort_accuracy_level)


@dataclass(frozen=True)
class ExecutionConfig(_Section):
    """Where and in how much memory the run solves."""

    workers: int = _option(1, "Solve each layer's rows on N local processes (1: this process, whose solver already "
                              "uses every core through threads). Same bits for any N.")
    ray_address: str | None = _option(None, "Solve on a Ray cluster at ADDRESS ('local' starts one here; pip install "
                                            "'onnx-qubo[ray]').", flag="--ray")
    max_memory: float | None = _option(None, "Memory the run may hold in GB (default: 60% of this machine's): the "
                                             "model's weights, one calibration pass's layer statistics and one "
                                             "layer's solve. Statistics that do not fit are gathered in several "
                                             "passes over the data.")
    batch_size: int = _option(256, "Samples per onnxruntime run.")

    def __post_init__(self) -> None:
        check_positive(self.max_memory, "max_memory", MAX_GB, "a positive number of GB")  # before the generic check
        super().__post_init__()
        check_integer(self.workers, "workers", minimum=1)
        check_integer(self.batch_size, "batch_size", minimum=1)

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else int(self.max_memory * 1e9)


@dataclass(frozen=True)
class AutomaticConfig(_Section):
    """Which layers are quantized at which bit width: by hand, or chosen by measuring each layer's
    model-output error alone (autoscheme.py)."""

    exclude: tuple[str, ...] = _option((), "Leave this layer in float (repeatable; names as `onnx-qubo inspect` "
                                           "lists them).")
    layer_bits: Mapping[str, int] = _option(factory=dict, help="Bit width for one layer, overriding --bits "
                                                               "(repeatable): mixed precision.")
    auto_scheme: bool = _option(False, "Per layer, the scheme with the least model-output error alone: per channel "
                                       "or blocks of 32, symmetric or asymmetric (each solved once; see `onnx-qubo "
                                       "sensitivity`).")
    size_budget: float | None = _option(None, "Model size to fit in MB: the layers that damage the output most per "
                                              "byte stay at 8 bits or float while it fits (measured alone on the "
                                              "calibration data).")
    max_error: float | None = _option(None, "Relative output error to reach: the most damaging layers per byte go "
                                            "to 8 bits or float until the estimate (per-layer errors added in "
                                            "squares) is below it.")
    bits_per_weight: float | None = _option(None, "Average bits per quantized weight to fit, scales and zero points "
                                                  "included (e.g. 2.5 with --bits 2): the layers that damage the "
                                                  "output most per byte get --bits + 1 .. 8 bits while it fits "
                                                  "(measured alone on the calibration data).")

    def __post_init__(self) -> None:
        check_positive(self.size_budget, "size_budget", MAX_GB * 1e3, "a number of MB above 0")  # its own words
        check_positive(self.bits_per_weight, "bits_per_weight", 32.0, "a number of bits above 0, at most 32")
        if self.bits_per_weight is not None and self.size_budget is not None:
            raise OptionError("{size_budget} and {bits_per_weight} both set the size: give one",
                              "size_budget", "bits_per_weight")
        super().__post_init__()

    @property
    def sized(self) -> bool:
        """Whether the size is a target (--size-budget or --bits-per-weight)."""
        return self.size_budget is not None or self.bits_per_weight is not None

    @property
    def enabled(self) -> bool:
        """Whether layers' schemes are chosen by measuring them."""
        return self.auto_scheme or self.sized or self.max_error is not None


SECTIONS = {"weights": WeightConfig, "rounding": RoundingConfig, "activations": ActivationConfig,
            "output": OutputConfig, "execution": ExecutionConfig, "automatic": AutomaticConfig}


@dataclass(frozen=True)
class Option:
    """One option as the CLI and the JSON file see it: flat name, section, field, default, help."""

    name: str
    section: str
    field: str
    default: object
    help: str
    flag: str


def _options() -> Iterator[Option]:
    for section, kind in SECTIONS.items():
        defaults = kind()
        for item in fields(kind):
            name = item.metadata.get("name") or item.name
            yield Option(name, section, item.name, getattr(defaults, item.name), item.metadata["help"],
                         item.metadata.get("flag") or "--" + name.replace("_", "-"))


OPTIONS = {option.name: option for option in _options()}  # flat name -> option, in file order


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything a quantization run is asked for; the combinations are checked on construction."""

    weights: WeightConfig = field(default_factory=WeightConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    automatic: AutomaticConfig = field(default_factory=AutomaticConfig)

    def __post_init__(self) -> None:
        for name, kind in SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise OptionError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        rounding, activations = self.rounding, self.activations
        if rounding.bias == BiasMode.INT32 and not activations.quantized:
            raise OptionError("{bias} int32 needs quantized inputs ({activations} int8 or uint8): its scale is "
                              "the input scale times the weight scale", "bias", "activations")
        if rounding.bias == BiasMode.QUANTIZE and rounding.bias_correction:
            raise OptionError("{bias_correction} re-fits a float bias; with {bias} quantize the bias is already "
                              "a variable of each neuron's QUBO", "bias_correction", "bias")
        if rounding.levels > 2 ** self.weights.bits:
            raise OptionError(f"{{levels}} {rounding.levels}: a {self.weights.bits}-bit grid has "
                              f"{2 ** self.weights.bits} levels", "levels", "bits")
        if self.weights.float_zero_points and activations.quantized:
            raise OptionError("{float_zero_points} are weight-only: onnxruntime's integer kernels take integer "
                              "zero points; drop {activations}", "float_zero_points", "activations")
        for bits in self.widths:
            reason = portable.scheme_refusal(self.weights.scheme(bits), activations.quantized)
            if reason:
                raise OptionError(reason, "symmetric", "granularity", "activations")
        self._check_format()
        self._check_automatic()

    @property
    def widths(self) -> set[int]:
        """Every bit width a layer may get: --bits, the output layers', the small layers', --layer-bits'."""
        planned = set() if self.automatic.enabled else {self.weights.output_bits} | (
            {SMALL_BITS} if self.weights.small_share else set())
        return {self.weights.bits, *planned, *self.automatic.layer_bits.values()}

    def _check_format(self) -> None:
        """Refuse what format ort cannot serve for any layer (single layers fall back, reported):
        onnxruntime's rules, in backends/kernels.py."""
        scheme = self.weights.scheme(self.weights.bits)
        check_format(self.output.format, self.output.ort_accuracy_level, self.activations.dtype.value,
                     scheme.granularity, scheme.block_size, sorted(self.widths),
                     self.automatic.auto_scheme)

    def _check_automatic(self) -> None:
        """The automatic choice measures every layer alone on the float model, with its own schemes."""
        automatic = self.automatic
        if not automatic.enabled:
            return
        names = ["auto_scheme", "size_budget", "bits_per_weight", "max_error"]
        automatic_flags = "{auto_scheme}/{size_budget}/{bits_per_weight}/{max_error}"
        if self.rounding.sequential:
            raise OptionError(f"{automatic_flags} measure each layer alone on the float model; "
                              "they do not combine with {sequential}", *names, "sequential")
        for option in ("layer_bits", "head_bits", "small_layers"):
            if getattr(self.automatic if option == "layer_bits" else self.weights, option):
                raise OptionError(f"{{{option}}} sets bit widths by hand, {automatic_flags} "
                                  "choose them: give one or the other", option, *names)
        if self.rounding.dump_qubo is not None or self.rounding.load_solution is not None:
            raise OptionError(f"{{dump_qubo}}/{{load_solution}} exchange one scheme's QUBOs; {automatic_flags} "
                              "solve several", "dump_qubo", "load_solution", *names)
        if self.output.embeddings:
            raise OptionError(f"{{embeddings}} tables are not measured by {automatic_flags} yet: "
                              "give one or the other", "embeddings", *names)

    # flat view: the CLI's flags and the API's keywords

    @classmethod
    def from_flat(cls, values: Mapping[str, object] | None = None, **more: object) -> QuantizeConfig:
        """A config from flat option names (``OPTIONS``; ``granularity`` a name or object, with
        ``block_size`` for blocks), the rest at their defaults."""
        values = {**(values or {}), **more}
        unknown = sorted(set(values) - set(OPTIONS) - {"block_size"})
        if unknown:
            raise OptionError(f"unknown option(s): {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
        if "granularity" in values or "block_size" in values:
            values["granularity"] = granularity_of(values.get("granularity", "block" if values.get("block_size")
                                                              else "channel"), values.pop("block_size", None))
        sections: dict[str, dict[str, object]] = {name: {} for name in SECTIONS}
        for name, value in values.items():
            sections[OPTIONS[name].section][OPTIONS[name].field] = value
        return cls(**{name: SECTIONS[name](**given) for name, given in sections.items()})  # type: ignore[arg-type]

    def flat(self) -> dict[str, object]:
        """Flat option name -> value (the inverse of ``from_flat``)."""
        return {name: getattr(getattr(self, option.section), option.field) for name, option in OPTIONS.items()}

    def updated(self, **changes: object) -> QuantizeConfig:
        """This config with some options (flat names) changed, checked again."""
        return QuantizeConfig.from_flat({**self.flat(), **changes})

    # file form: JSON, sections and keys in declaration order, so a saved config is byte-reproducible

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {name: {item.name: _plain(getattr(getattr(self, name), item.name)) for item in fields(kind)}
                for name, kind in SECTIONS.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: object, origin: str = "config") -> QuantizeConfig:
        """A config from its file form; an unknown key or bad value is refused naming the key."""
        keys = {option.name: f"{option.section}.{option.field}" for option in OPTIONS.values()}
        keys["block_size"] = "weights.granularity"
        if not isinstance(data, Mapping):
            raise OptionError(f"{origin}: expected an object of sections ({', '.join(SECTIONS)})")
        flat: dict[str, object] = {}
        for section, given in data.items():
            if section not in SECTIONS:
                raise OptionError(f"{origin}: unknown key '{section}' (sections: {', '.join(SECTIONS)})")
            if not isinstance(given, Mapping):
                raise OptionError(f"{origin}: '{section}' must be an object")
            known = {option.field: option.name for option in OPTIONS.values() if option.section == section}
            for key, value in given.items():
                if key not in known:
                    raise OptionError(f"{origin}: unknown key '{section}.{key}' (known: {', '.join(known)})")
                flat[known[key]] = value
        given_granularity = flat.get("granularity")
        if isinstance(given_granularity, Mapping):  # {"block": 32}
            flat["granularity"], flat["block_size"] = next(iter(given_granularity.items())) \
                if len(given_granularity) == 1 else (given_granularity, None)
        try:
            return cls.from_flat(flat)
        except OptionError as error:
            raise OptionError(f"{origin}: {error.render(keys)}") from None

    @classmethod
    def from_json(cls, text: str, origin: str = "config") -> QuantizeConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise OptionError(f"{origin}: not JSON ({error})") from None
        return cls.from_dict(data, origin)

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON form to ``path`` (a plain write: the CLI checks its output paths first)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantizeConfig:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise OptionError(f"cannot read config '{path}': {error}") from None
        return cls.from_json(text, str(path))

    def describe(self) -> str:
        """The scheme in words, for reports."""
        weights, activations = self.weights, self.activations
        asymmetric = "asymmetric (float zero points)" if weights.float_zero_points else "asymmetric"
        zero_point = {True: "symmetric", False: f"asymmetric ({'float ' * weights.float_zero_points}zero points)",
                      None: f"symmetric or {asymmetric} per layer"}[weights.symmetric]
        groups = (f"blocks of {weights.granularity.size} inputs" if isinstance(weights.granularity, PerBlock)
                  else f"per {weights.granularity.kind}")
        correction = {True: ", corrected", False: "", None: ", corrected where a layer has one"}[
            self.rounding.bias_correction if self.rounding.bias != BiasMode.QUANTIZE else False]
        text = f"weights {groups}, {zero_point}; bias {self.rounding.bias}{correction}; activations {activations.dtype}"
        if activations.quantized:
            text += f" ({activations.range} ranges)"
        text += "; sequential calibration" if self.rounding.sequential else ""
        if self.rounding.rotate == Rotation.HADAMARD:
            text += f"; inputs rotated (random-sign Hadamard, blocks up to {self.rounding.rotate_block})"
        elif self.rounding.rotate == Rotation.WHOLE:
            text += ("; inputs rotated (random-sign Hadamard of the whole width where one is at hand, Sylvester "
                     f"factor up to {self.rounding.rotate_block})")
        if self.rounding.rotate_convs and self.rounding.rotate != Rotation.NONE:
            text += ", Conv input channels too"
        if self.rounding.rotate_residual and self.rounding.rotate != Rotation.NONE:
            text += ", the residual stream between RMS norms as one"
        if self.rounding.damping == AUTO:
            text += "; Gram matrices damped per layer by their calibration samples' spread (Ledoit-Wolf)"
        elif self.rounding.damping:
            text += f"; Gram matrices damped by {self.rounding.damping:g} of their mean diagonal"
        text += "; embedding tables per row" if self.output.embeddings else ""
        automatic = self.automatic
        if automatic.enabled:
            chosen = ["scheme chosen"] if automatic.auto_scheme else []
            chosen += [] if automatic.size_budget is None else [f"within {automatic.size_budget:g} MB"]
            chosen += [] if automatic.bits_per_weight is None else [
                f"within {automatic.bits_per_weight:g} bits per weight"]
            chosen += [] if automatic.max_error is None else [f"to output error {automatic.max_error:g}"]
            text += "; per layer: " + ", ".join(chosen)
        if self.output.format == Format.ORT:
            level = self.output.ort_accuracy_level
            text += "; format ort" + ("" if level == 0 else f" (accuracy level {'auto' if level is None else level})")
        return text


def _plain(value: object) -> object:
    """A field's JSON value: enums as strings, granularity as its name or {"block": size}."""
    if isinstance(value, Choice):
        return value.value
    if isinstance(value, PerBlock):
        return {"block": value.size}
    if isinstance(value, (PerChannel, PerTensor)):
        return value.kind.value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


__all__ = ["QuantizeConfig", "WeightConfig", "RoundingConfig", "ActivationConfig", "OutputConfig", "ExecutionConfig",
           "AutomaticConfig", "PerChannel", "PerTensor", "PerBlock", "OPTIONS"]
