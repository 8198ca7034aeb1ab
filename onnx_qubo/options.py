"""The option vocabulary: every choice a caller makes, typed and validated in one place.

``QuantizeOptions`` is what the API and the CLI build from their arguments (strings are turned
into the enums below); constructing one checks every value and every combination that does
not need the model. ``plan.make_plan`` then resolves it against the model's layers. Errors
name options by their API spelling (``OptionError`` keeps the names, so the CLI can show its
flags instead).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .backends import portable
from .backends.kernels import Format, check_format
from .choice import Choice, parse_choice
from .errors import OptionError
from .grid import MAX_BITS, MIN_BITS, Granularity, Scheme
from .solvers import SOLVERS, FastSolver, Solver


class ScaleMethod(Choice):
    MSE = "mse"  # clipping ratio per group minimizing the round-to-nearest QUBO cost
    MINMAX = "minmax"  # the group's full range
    QUBO = "qubo"  # the best few ratios of mse, re-ranked by the solved cost


class BiasMode(Choice):
    FLOAT = "float"  # kept as it is
    QUANTIZE = "quantize"  # one more QUBO variable per neuron, at the weights' bit width (the paper)
    INT32 = "int32"  # QDQ convention: input scale x weight scale, zero point 0


class Activations(Choice):
    NONE = "none"
    INT8 = "int8"
    UINT8 = "uint8"


class RangeMethod(Choice):
    MINMAX = "minmax"
    PERCENTILE = "percentile"


def check_integer(value: object, option: str, minimum: int | None = None) -> int:
    """``value`` as an int (bools and fractions refused), at least ``minimum`` if given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"{{{option}}} must be an integer, got {value!r}", option)
    if minimum is not None and value < minimum:
        raise OptionError(f"{{{option}}} must be at least {minimum}, got {value}", option)
    return int(value)


MAX_GB = 1e9  # an exabyte: past any machine, and its bytes still an int64 (numpy, onnxruntime)


def check_gigabytes(value: object, option: str) -> int:
    """A positive amount of memory in GB (10^9 bytes), at most MAX_GB, as bytes."""
    amount = check_positive(value, option, MAX_GB, "a positive number of GB")
    assert amount is not None
    return int(amount * 1e9)


def check_bits(bits: object, option: str = "bits") -> int:
    """An integer bit width in [MIN_BITS, MAX_BITS]."""
    value = check_integer(bits, option)
    if not MIN_BITS <= value <= MAX_BITS:
        raise OptionError(f"{{{option}}} must be between {MIN_BITS} and {MAX_BITS}, got {value}", option)
    return value


def check_positive(value: object, option: str, maximum: float = float("inf"),
                   what: str = "a number above 0") -> float | None:
    """None, or a finite number above 0 and at most ``maximum`` (bools, and integers past any
    float, refused)."""
    if value is None:
        return None
    try:
        amount = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    except OverflowError:  # an int past any float (10**400)
        amount = None
    if amount is None or not 0 < amount < float("inf"):
        raise OptionError(f"{{{option}}} must be {what}, got {_short(value)}", option)
    if amount > maximum:
        raise OptionError(f"{{{option}}} must be {what} up to {maximum:g}, got {_short(value)}", option)
    return amount


def _short(value: object) -> str:
    """``repr(value)``, an integer of hundreds of digits written as its magnitude."""
    text = repr(value)
    return text if len(text) <= 24 or not isinstance(value, int) else f"an integer of {len(str(abs(value)))} digits"


def solver_for(solver: str | Solver) -> Solver:
    """A solver object from its name (``SOLVERS``), or the object itself."""
    if not isinstance(solver, str):
        return solver
    if solver not in SOLVERS:
        raise OptionError(f"{{solver}} must be one of {', '.join(SOLVERS)}, got {solver!r}", "solver")
    return SOLVERS[solver]()


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything a quantization run was asked for, its combinations checked on construction.
    ``parse`` builds one from loosely typed arguments (strings for the enums, a solver name)."""

    bits: int = 2
    scale: ScaleMethod = ScaleMethod.MSE
    solver: Solver = field(default_factory=FastSolver)
    seed: int = 0
    granularity: Granularity = Granularity.CHANNEL
    block_size: int = 0  # inputs per scale, with granularity block
    symmetric: bool = True  # signed grid, zero point 0; else unsigned grid with zero points
    bias: BiasMode = BiasMode.FLOAT
    activations: Activations = Activations.NONE
    activation_range: RangeMethod = RangeMethod.MINMAX
    sequential: bool = False  # calibrate each layer on the outputs of the quantized earlier ones
    bias_correction: bool = False  # shift each output by the mean error the rounding leaves
    layer_bits: Mapping[str, int] = field(default_factory=dict)  # layer name -> bits, overriding ``bits``
    exclude: tuple[str, ...] = ()  # layers left in float
    lower_bound: bool = False  # certify a lower bound per layer (O(n f^2) per iteration: opt-in)
    dump_dir: Path | None = None  # write each layer's QUBOs here (exchange.py's format)
    solution_dir: Path | None = None  # take the roundings from here instead of solving
    format: Format = Format.QDQ  # portable DequantizeLinear, or onnxruntime's fast kernels
    ort_accuracy_level: int = 0  # MatMulNBits: 0 float compute; 4 int8 activations in the kernel
    workers: int = 1  # local processes solving a layer's rows (1: in this process, its threads)
    ray_address: str | None = None  # solve on this Ray cluster ("local": start one here)
    max_memory: int | None = None  # bytes a run may hold (memory.py); None: a share of physical memory
    embeddings: bool = False  # also quantize constant Gather tables (embeddings) per row, at ``bits``
    # automatic per-layer choices (autoscheme.py): from each layer's output error measured alone
    auto_scheme: bool = False  # per layer: channel or blocks of 32, symmetric or not
    size_budget: float | None = None  # MB of the whole model: layers kept at 8 bits or float while it fits
    max_error: float | None = None  # estimated relative output error to reach (most damaging layers first)

    @classmethod
    def parse(cls, *, bits: object = 2, scale: object = ScaleMethod.MSE, solver: str | Solver = "fast",
              seed: object = 0, granularity: object = Granularity.CHANNEL, block_size: object = 0,
              symmetric: bool = True, bias: object = BiasMode.FLOAT, activations: object = Activations.NONE,
              activation_range: object = RangeMethod.MINMAX, sequential: bool = False, bias_correction: bool = False,
              layer_bits: Mapping[str, object] | None = None, exclude: Sequence[str] = (), lower_bound: bool = False,
              dump_dir: Path | None = None, solution_dir: Path | None = None, format: object = Format.QDQ,
              ort_accuracy_level: object = 0, workers: object = 1,
              ray_address: str | None = None, max_memory: object = None, embeddings: bool = False,
              auto_scheme: bool = False, size_budget: object = None, max_error: object = None) -> "QuantizeOptions":
        """Options from the API's arguments: each value checked and named in the error if wrong
        (``max_memory`` in GB)."""
        return cls(bits=check_bits(bits), scale=parse_choice(ScaleMethod, scale, "scale"), solver=solver_for(solver),
                   seed=check_integer(seed, "seed"), granularity=parse_choice(Granularity, granularity, "granularity"),
                   block_size=check_integer(block_size, "block_size"), symmetric=bool(symmetric),
                   bias=parse_choice(BiasMode, bias, "bias"),
                   activations=parse_choice(Activations, activations, "activations"),
                   activation_range=parse_choice(RangeMethod, activation_range, "activation_range"),
                   sequential=bool(sequential), bias_correction=bool(bias_correction),
                   layer_bits={name: check_bits(b, "layer_bits") for name, b in dict(layer_bits or {}).items()},
                   exclude=tuple(exclude), lower_bound=lower_bound, dump_dir=dump_dir, solution_dir=solution_dir,
                   format=parse_choice(Format, format, "format"),
                   ort_accuracy_level=check_integer(ort_accuracy_level, "ort_accuracy_level"),
                   workers=check_integer(workers, "workers", minimum=1), ray_address=ray_address,
                   max_memory=None if max_memory is None else check_gigabytes(max_memory, "max_memory"),
                   embeddings=bool(embeddings), auto_scheme=bool(auto_scheme),
                   size_budget=check_positive(size_budget, "size_budget", MAX_GB * 1e3, "a number of MB above 0"),
                   max_error=check_positive(max_error, "max_error"))

    def __post_init__(self) -> None:
        if self.bias == BiasMode.INT32 and self.activations == Activations.NONE:
            raise OptionError("{bias} int32 needs quantized inputs ({activations} int8 or uint8): its scale is "
                              "the input scale times the weight scale", "bias", "activations")
        if self.bias == BiasMode.QUANTIZE and self.bias_correction:
            raise OptionError("{bias_correction} re-fits a float bias; with {bias} quantize the bias is already "
                              "a variable of each neuron's QUBO", "bias_correction", "bias")
        try:
            Scheme(self.bits, self.granularity, self.block_size, self.symmetric)
        except ValueError as exc:
            raise OptionError(f"{{granularity}}/{{block_size}}: {exc}", "granularity", "block_size") from None
        for bits in {self.bits, *self.layer_bits.values()}:
            reason = portable.scheme_refusal(self.scheme(bits), self.activations != Activations.NONE)
            if reason:
                raise OptionError(reason, "symmetric", "granularity", "activations")
        self._check_format()
        self._check_automatic()
        distributed = self.workers > 1 or self.ray_address is not None
        if distributed and not isinstance(self.solver, tuple(SOLVERS.values())):
            raise OptionError("{workers}/{ray_address}: only the solvers onnx-qubo names (" + ", ".join(SOLVERS)
                              + ") can be shipped to other processes", "workers", "ray_address")

    def _check_format(self) -> None:
        """Refuse what format ort cannot serve for any layer (single layers fall back, reported)."""
        check_format(self.format, self.ort_accuracy_level, self.activations.value, self.granularity,
                     self.block_size, [self.bits, *self.layer_bits.values()], self.auto_scheme)

    @property
    def automatic(self) -> bool:
        """Whether layers' schemes are chosen by measuring them (autoscheme.py)."""
        return self.auto_scheme or self.size_budget is not None or self.max_error is not None

    def _check_automatic(self) -> None:
        """The automatic choice measures every layer alone on the float model, with its own schemes."""
        if not self.automatic:
            return
        names = ["auto_scheme", "size_budget", "max_error"]
        if self.sequential:
            raise OptionError("{auto_scheme}/{size_budget}/{max_error} measure each layer alone on the float model; "
                              "they do not combine with {sequential}", *names, "sequential")
        if self.layer_bits:
            raise OptionError("{layer_bits} sets bit widths by hand, {auto_scheme}/{size_budget}/{max_error} "
                              "choose them: give one or the other", "layer_bits", *names)
        if self.dump_dir is not None or self.solution_dir is not None:
            raise OptionError("{dump_qubo}/{load_solution} exchange one scheme's QUBOs; {auto_scheme}/{size_budget}/"
                              "{max_error} solve several", "dump_qubo", "load_solution", *names)
        if self.embeddings:
            raise OptionError("{embeddings} tables are not measured by {auto_scheme}/{size_budget}/{max_error} yet: "
                              "give one or the other", "embeddings", *names)

    def scheme(self, bits: int) -> Scheme:
        return Scheme(bits, self.granularity, self.block_size, self.symmetric)

    def describe(self) -> str:
        """The scheme in words, for reports."""
        zero_point = "symmetric" if self.symmetric else "asymmetric (zero points)"
        if self.granularity == Granularity.BLOCK:
            groups = f"blocks of {self.block_size} inputs"
        else:
            groups = f"per {self.granularity}"
        text = f"weights {groups}, {zero_point}; bias {self.bias}; activations {self.activations}"
        if self.activations != Activations.NONE:
            text += f" ({self.activation_range} ranges)"
        text += "; sequential calibration" if self.sequential else ""
        text += "; embedding tables per row" if self.embeddings else ""
        if self.automatic:
            chosen = ["scheme chosen"] if self.auto_scheme else []
            chosen += [] if self.size_budget is None else [f"within {self.size_budget:g} MB"]
            chosen += [] if self.max_error is None else [f"to output error {self.max_error:g}"]
            text += "; per layer: " + ", ".join(chosen)
        if self.format == Format.ORT:
            text += "; format ort" + (f" (accuracy level {self.ort_accuracy_level})" if self.ort_accuracy_level else "")
        return text
