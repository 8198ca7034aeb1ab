"""Checks of option values shared by the API entry points (the CLI's click types check flags)."""

from __future__ import annotations

import numbers

from .errors import OptionError
from .grid import MAX_BITS, MIN_BITS


def check_bits(value: object, option: str = "bits") -> int:
    """``value`` as an int bit width in [MIN_BITS, MAX_BITS]; OptionError naming ``option`` for
    anything else (2.5, '4', True, None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"{option} must be an integer between {MIN_BITS} and {MAX_BITS}, "
                          f"got {value!r} ({type(value).__name__})", option)
    if not MIN_BITS <= int(value) <= MAX_BITS:
        raise OptionError(f"{option} must be between {MIN_BITS} and {MAX_BITS}, got {value}", option)
    return int(value)
