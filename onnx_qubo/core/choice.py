"""Options with a fixed set of values: enums whose members are their values as strings."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from .errors import OptionError


class Choice(str, Enum):
    """An option value; compares equal to, and prints as, its string."""

    def __str__(self) -> str:
        return str(self.value)


C = TypeVar("C", bound=Choice)


def parse_choice(kind: type[C], value: object, option: str) -> C:
    """``value`` as a member of ``kind``, or an OptionError naming ``option`` and the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(member) for member in kind)
        raise OptionError(f"{{{option}}} must be one of {choices}, got {value!r}", option) from None
