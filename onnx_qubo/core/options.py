"""The option vocabulary: the choices an option takes (enums) and the checks of single values.

config.py declares the options with these; errors name options by their API spelling
(``OptionError`` keeps the names, so the CLI can show its flags instead).
"""

from __future__ import annotations

import numbers
from typing import Literal, Union

from .choice import Choice
from .errors import OptionError
from .grid import MAX_BITS, MIN_BITS


class ScaleMethod(Choice):
    AUTO = "auto"  # resolved per model before a run (api.py): fit for a float32 language model below 4 bits
    MSE = "mse"  # clipping ratio per group minimizing the round-to-nearest QUBO cost
    MINMAX = "minmax"  # the group's full range
    QUBO = "qubo"  # the best few ratios of mse, re-ranked by the solved cost
    FIT = "fit"  # mse's, then refitted by least squares to the solved codes, solved again (per row: the better)


class Rotation(Choice):
    AUTO = "auto"  # resolved per model before a run (api.py): whole for a float32 language model below 4 bits
    NONE = "none"
    HADAMARD = "hadamard"  # random signs, then a Hadamard transform per block of inputs (rotation.py)
    WHOLE = "whole"  # random signs, then one Hadamard transform of the whole input width where one is at hand


AUTO: Literal["auto"] = "auto"
Damping = Union[float, Literal["auto"]]  # --damping: a fraction of the mean diagonal, or auto (calibration/spread.py)


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
