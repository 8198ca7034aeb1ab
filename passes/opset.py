"""Raise the default-domain opset (and the IR version with it) without changing semantics."""

from __future__ import annotations

import logging

import onnx
from onnx import defs, helper, version_converter

from .base import PassResult, copy_model
from .errors import UnsupportedModel

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")


class RaiseOpset:
    """Bring the default-domain opset up to ``target`` (never down).

    When no operator the model uses changed its definition between the two versions, the
    import is simply bumped; otherwise onnx's version converter rewrites the affected nodes.
    """

    def __init__(self, target: int) -> None:
        self.target = target

    def call(self, model: onnx.ModelProto) -> PassResult:
        current = default_opset(model)
        if current >= self.target:
            return PassResult(model, modified=False)
        if all(_same_definition(op, current, self.target) for op in _default_domain_ops(model.graph)):
            raised = copy_model(model)
            for opset in raised.opset_import:
                if opset.domain in DEFAULT_DOMAINS:
                    opset.version = self.target
        else:
            try:
                raised = version_converter.convert_version(model, self.target)
            except Exception as exc:  # the converter raises bare RuntimeErrors
                raise UnsupportedModel(f"cannot raise the model's opset from {current} to {self.target} "
                                 f"(needed by the integer weight type): {exc}") from None
            if not raised.functions:  # the converter drops the model's local functions
                raised.functions.extend(model.functions)
        _raise_functions(raised, self.target)
        log.info("raised the default-domain opset from %d to %d", current, self.target)
        raised.ir_version = max(raised.ir_version, helper.find_min_ir_version_for(
            list(raised.opset_import), ignore_unknown=True))
        return PassResult(raised, modified=True)


def _raise_functions(model: onnx.ModelProto, target: int) -> None:
    """Bring each local function's default-domain import up to ``target`` (onnx requires it to
    match the model's); a UnsupportedModel naming the function when one of its ops changed meaning."""
    for function in model.functions:
        for opset in function.opset_import:
            if opset.domain not in DEFAULT_DOMAINS or opset.version >= target:
                continue
            ops = {node.op_type for node in function.node if node.domain in DEFAULT_DOMAINS}
            changed = sorted(op for op in ops if not _same_definition(op, opset.version, target))
            if changed:
                raise UnsupportedModel(f"local function '{function.domain}.{function.name}' uses {', '.join(changed)} "
                                 f"as defined at opset {opset.version}, changed before opset {target}, which the "
                                 "integer weight type needs; onnx cannot convert functions: inline the function "
                                 "or use more bits (INT8 weights need opset 13)")
            opset.version = target


def default_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), default=1)


def _same_definition(op_type: str, old: int, new: int) -> bool:
    try:
        return defs.get_schema(op_type, old).since_version == defs.get_schema(op_type, new).since_version
    except defs.SchemaError:
        return False


def _default_domain_ops(graph: onnx.GraphProto) -> set[str]:
    ops = set()
    for node in graph.node:
        if node.domain in DEFAULT_DOMAINS:
            ops.add(node.op_type)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                ops |= _default_domain_ops(sub)
    return ops
