"""Validate a model with onnx's full checker (shape and type inference included)."""

from __future__ import annotations

import onnx

from .base import PassResult


class CheckModel:
    """Raises ``onnx.checker.ValidationError`` (or an inference error) on an invalid model."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        onnx.checker.check_model(model, full_check=True)
        return PassResult(model, modified=False)
