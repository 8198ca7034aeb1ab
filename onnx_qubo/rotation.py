"""``rotate``: incoherence processing before calibration (passes/rotate.py's ``RotateInputs``).

The float model's dense layers get a random-sign block Hadamard rotation of their input space
(folded into a linear producer, else an online transform the layers read), so calibration
captures the rotated inputs and the QUBO rounds the rotated weights with no other change. The
online transforms' MatMuls are not layers to quantize (``passes.online_rotations`` names them).
"""

from __future__ import annotations

import onnx

from . import external
from .choice import Choice, parse_choice
from .errors import OptionError
from .lowering import run_passes
from .options import check_integer
from .passes import RotateInputs


class Rotation(Choice):
    NONE = "none"
    HADAMARD = "hadamard"  # random signs, then a Hadamard transform per block of inputs


def parse_rotation(rotate: object, block: object) -> tuple[Rotation, int]:
    """The rotation and its largest block (a power of two, at least 2), or an OptionError."""
    rotation = parse_choice(Rotation, rotate, "rotate")
    size = check_integer(block, "rotate_block", minimum=2)
    if size & (size - 1):
        raise OptionError(f"{{rotate_block}} must be a power of two, got {size}", "rotate_block")
    return rotation, size


def rotate(model: onnx.ModelProto, rotation: Rotation, block: int, seed: int) -> onnx.ModelProto:
    """``model`` with its layers' inputs rotated (itself with ``Rotation.NONE``); same outputs."""
    if rotation == Rotation.NONE:
        return model
    return run_passes(model, [RotateInputs(seed, block, external.read_array)]).model


def describe(rotation: Rotation, block: int) -> str:
    """The rotation as the report's scheme line says it ('' for none)."""
    return "" if rotation == Rotation.NONE else f"; inputs rotated (random-sign Hadamard, blocks up to {block})"

