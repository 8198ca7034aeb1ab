"""Raise the default-domain opset (and the IR version with it) without changing semantics."""

from __future__ import annotations

import logging

import onnx
from onnx import defs, helper, version_converter

from .base import PassResult, copy_model
from .check import runtime_ops_apart, runtime_ops_back
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
            raised = _convert(model, self.target, current)
            if not raised.functions:  # the converter drops the model's local functions
                raised.functions.extend(model.functions)
        _raise_functions(raised, self.target)
        log.info("raised the default-domain opset from %d to %d", current, self.target)
        raised.ir_version = max(raised.ir_version, helper.find_min_ir_version_for(
            list(raised.opset_import), ignore_unknown=True))
        return PassResult(raised, modified=True)


def _convert(model: onnx.ModelProto, target: int, current: int) -> onnx.ModelProto:
    """onnx's version converter on ``model``, the default-domain ops onnx does not define
    (onnxruntime's own, which keep their meaning at any opset) set apart while it runs; retried
    without the declared intermediate shapes when they contradict its inference (an exporter's
    mistake: onnxruntime-genai's builder declares a ``[1]`` Constant as rank 0)."""
    apart = runtime_ops_apart(model)
    try:
        return _declared_kept(runtime_ops_back(version_converter.convert_version(apart, target)), model)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        failure = exc
    if apart.graph.value_info:
        undeclared = copy_model(apart)
        del undeclared.graph.value_info[:]
        try:
            converted = runtime_ops_back(version_converter.convert_version(undeclared, target))
        except Exception:  # the first failure is the one to report
            pass
        else:
            return _declared_kept(converted, model)
    raise UnsupportedModel(f"cannot raise the model's opset from {current} to {target} "
                           f"(needed by the integer weight type): {failure}") from None


def _declared_kept(converted: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """``converted`` keeping ``model``'s declared shapes where the converter's own inference found
    none (behind a data-dependent Reshape it writes a shapeless type over the declared one)."""
    declared = {info.name: info for info in model.graph.value_info}
    infos = [declared.get(info.name, info) if not info.type.tensor_type.HasField("shape") else info
             for info in converted.graph.value_info]
    known = {info.name for info in infos}
    infos += [info for info in model.graph.value_info if info.name not in known]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(infos)
    return converted


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
    """Whether ``op_type`` means the same at both opsets (an op onnx does not define, e.g.
    onnxruntime's SimplifiedLayerNormalization, is onnxruntime's at any opset)."""
    if not defs.has(op_type):
        return True
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
