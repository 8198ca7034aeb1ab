"""The records behind a layer's input view (``types.InputView``, made by forms/) when its vectors
are not one tensor read as is:

- ``ConvGeometry``: a Conv's patches (patches.py builds them, im2col): one input vector per
  output position, one layer problem per group;
- ``RecurrentCell``: an LSTM/RNN's gate inputs ``[x_t; h_(t-1)]`` (forms/recurrent.py), one layer
  problem per direction.

Plain records with their arithmetic; they import nothing of onnx_qubo, so patches.py, grams.py
and backends/ can use them below forms/.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


@dataclass(frozen=True)
class ConvGeometry:
    """Shape of one Conv: channels, groups, kernel, strides, dilations and padding.

    ``pads`` is ONNX's ``[x1_begin, .., xd_begin, x1_end, .., xd_end]``; with ``auto_pad``
    SAME_UPPER/SAME_LOWER the padding depends on the input's spatial shape and is resolved by
    ``padding`` per input (``pads`` is then unused), with VALID it is zero.
    """

    out_channels: int  # M
    in_channels: int  # C
    groups: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str = "NOTSET"

    def __post_init__(self) -> None:
        d = len(self.kernel)
        if not 1 <= d <= 3:
            raise ValueError(f"Conv with {d} spatial axes; 1 to 3 are supported")
        if len(self.strides) != d or len(self.dilations) != d or len(self.pads) != 2 * d:
            raise ValueError("strides and dilations need one value per spatial axis, pads two")
        if self.auto_pad not in AUTO_PADS:
            raise ValueError(f"auto_pad must be one of {', '.join(AUTO_PADS)}, got '{self.auto_pad}'")
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} does not divide C={self.in_channels} and M={self.out_channels}")
        if min(self.kernel + self.strides + self.dilations) < 1 or min(self.pads) < 0:
            raise ValueError("kernel, strides and dilations must be positive, pads non-negative")

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any], weight_shape: tuple[int, ...],
                        in_channels: int | None = None) -> ConvGeometry:
        """From a Conv node's attributes (name -> value, as ``onnx.helper.get_attribute_value``
        gives them; strings as str or bytes) and its weight shape ``[M, C/groups, k1..kd]``."""
        m, c_group, *kernel = (int(n) for n in weight_shape)
        d = len(kernel)
        groups = int(attributes.get("group", 1))
        if "kernel_shape" in attributes and tuple(attributes["kernel_shape"]) != tuple(kernel):
            raise ValueError(f"kernel_shape {attributes['kernel_shape']} differs from the weight's {kernel}")
        if in_channels is not None and in_channels != c_group * groups:
            raise ValueError(f"input has {in_channels} channels; the weight expects {c_group * groups}")
        auto_pad = attributes.get("auto_pad", "NOTSET")
        return cls(m, c_group * groups, groups, tuple(kernel),
                   tuple(attributes.get("strides", [1] * d)),
                   tuple(attributes.get("dilations", [1] * d)),
                   tuple(attributes.get("pads", [0] * 2 * d)),
                   auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad))

    @property
    def features(self) -> int:
        """f: weights per output channel, the width of a patch."""
        return self.in_channels // self.groups * int(np.prod(self.kernel))

    @property
    def channels_per_group(self) -> int:
        """Output channels of each group (M / groups): the neurons sharing one Gram matrix."""
        return self.out_channels // self.groups

    def padding(self, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(begin, end) zero padding per spatial axis for an input of this spatial shape."""
        d = len(self.kernel)
        if self.auto_pad == "NOTSET":
            return self.pads[:d], self.pads[d:]
        if self.auto_pad == "VALID":
            return (0,) * d, (0,) * d
        begin, end = [], []
        for n, k, s, dil in zip(spatial, self.kernel, self.strides, self.dilations):
            total = max(0, (-(-n // s) - 1) * s + (k - 1) * dil + 1 - n)  # output ceil(n / s)
            head = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
            begin.append(head)
            end.append(total - head)
        return tuple(begin), tuple(end)

    def input_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why an input of ``shape`` ``[B, C, *spatial]`` does not fit this Conv (onnxruntime
        would refuse to run it too), or None when it fits."""
        d = len(self.kernel)
        if len(shape) != d + 2 or shape[1] != self.in_channels:
            return (f"input shape {tuple(shape)} does not fit a Conv over {self.in_channels} channels (weight "
                    f"[M, C/group, ...] with group {self.groups}) and {d} spatial axes")
        begin, end = self.padding(tuple(shape[2:]))
        dilated = tuple((k - 1) * dil + 1 for k, dil in zip(self.kernel, self.dilations))
        if any(n + b + e < k for n, b, e, k in zip(shape[2:], begin, end, dilated)):
            return f"input spatial shape {tuple(shape[2:])} (padded) is smaller than the dilated kernel {dilated}"
        return None

    def output_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Output spatial shape for an input of this spatial shape."""
        begin, end = self.padding(spatial)
        out = tuple((n + b + e - (k - 1) * dil - 1) // s + 1
                    for n, b, e, k, s, dil in zip(spatial, begin, end, self.kernel, self.strides, self.dilations))
        if min(out) < 1:
            raise ValueError(f"input spatial shape {spatial} is smaller than the dilated kernel")
        return out

    def group_of(self) -> np.ndarray:
        """Group index of each output channel [M] (channel m reads group m // (M/groups))."""
        return np.arange(self.out_channels) // self.channels_per_group

    def rows_of(self, group: int) -> slice:
        """The output channels (rows of the flat weight) of one group."""
        n = self.channels_per_group
        return slice(group * n, (group + 1) * n)


@dataclass(frozen=True, eq=False)
class RecurrentCell:
    """What calibration needs to build one recurrent node's gate inputs from its tensors."""

    op_type: str
    reverse: tuple[bool, ...]  # per direction (W's first axis): whether it runs backwards in time
    input_size: int  # I
    hidden: int  # H
    layout: int  # 0: X [T, B, I], Y [T, D, B, H]; 1: X [B, T, I], Y [B, T, D, H]
    output: str  # Y (a name of our own when the node does not write Y: ``named`` False)
    named: bool
    initial_h: str | np.ndarray | None  # a tensor to read, a constant, or zeros
    sequence_lens: str | np.ndarray | None  # a tensor to read, a constant, or every step

    @property
    def directions(self) -> int:
        return len(self.reverse)

    @property
    def tensors(self) -> tuple[str, ...]:
        """The tensors besides X to read on every calibration batch."""
        return (self.output,) + tuple(t for t in (self.initial_h, self.sequence_lens) if isinstance(t, str))

    def gate_inputs(self, x: np.ndarray, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[x_t; h_(t-1)]`` of every step each sample runs, per direction: [D, rows, I+H]
        (rows ordered by step, then sample). ``x``: X as the node sees it; ``tensors``: Y (and
        initial_h, sequence_lens when they are tensors) from the same run."""
        x = np.asarray(x, np.float64)
        y = np.asarray(tensors[self.output], np.float64)
        if self.layout:
            x, y = x.transpose(1, 0, 2), y.transpose(1, 2, 0, 3)  # -> [T, B, I], [T, D, B, H]
        steps, batch = x.shape[:2]
        if x.shape[2] != self.input_size or y.shape != (steps, self.directions, batch, self.hidden):
            raise ValueError(f"{self.op_type} input {x.shape} and output {y.shape} do not fit I={self.input_size}, "
                             f"H={self.hidden}, {self.directions} direction(s)")
        h0: np.ndarray = np.zeros((self.directions, batch, self.hidden))
        if self.initial_h is not None:
            given = np.asarray(self._value(self.initial_h, tensors), np.float64)
            h0 = given.reshape(batch, self.directions, self.hidden).transpose(1, 0, 2) if self.layout else \
                given.reshape(h0.shape)
        lengths = np.full(batch, steps)
        if self.sequence_lens is not None:
            lengths = np.asarray(self._value(self.sequence_lens, tensors), np.int64).reshape(batch)
        run = np.arange(steps)[:, None] < lengths[None, :]  # [T, B]: the steps each sample runs
        started = np.nonzero(lengths > 0)[0]
        out = []
        for d, backwards in enumerate(self.reverse):
            previous = np.empty((steps, batch, self.hidden))
            if backwards:  # step t follows step t+1; the sample's last step starts from initial_h
                previous[:-1] = y[1:, d]
                previous[lengths[started] - 1, started] = h0[d, started]
            else:
                previous[0] = h0[d]
                previous[1:] = y[:-1, d]
            out.append(np.hstack([x[run], previous[run]]))
        return np.stack(out)

    @staticmethod
    def _value(tensor: str | np.ndarray, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        return tensors[tensor] if isinstance(tensor, str) else tensor
