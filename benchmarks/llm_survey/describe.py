"""Describe a genai-built model.onnx: IO, ops, contrib ops, weighted MatMuls, external data layout."""

import collections
import sys

import onnx
from onnx import TensorProto, helper

path = sys.argv[1]
m = onnx.load(path, load_external_data=False)
g = m.graph
print("ir_version", m.ir_version, "producer", m.producer_name, m.producer_version)
print("opsets", [(o.domain or "ai.onnx", o.version) for o in m.opset_import])


def shp(vi):
    t = vi.type.tensor_type
    return [d.dim_param or d.dim_value for d in t.shape.dim], TensorProto.DataType.Name(t.elem_type)


print("inputs", len(g.input))
for vi in list(g.input)[:4] + list(g.input)[-1:]:
    print("  ", vi.name, *shp(vi))
print("outputs", len(g.output))
for vi in list(g.output)[:3] + list(g.output)[-1:]:
    print("  ", vi.name, *shp(vi))
c = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in g.node)
print("nodes", len(g.node))
for (d, o), k in sorted(c.items(), key=lambda x: -x[1]):
    print(f"   {d:20s} {o:35s} {k}")
inits = {i.name: i for i in g.initializer}
print("initializers", len(inits))
ext = collections.Counter()
for i in inits.values():
    loc = {e.key: e.value for e in i.external_data}
    ext[loc.get("location", "<inline>")] += 1
print("external data locations", dict(ext))
# show first few initializers with offsets
for i in list(inits.values())[:5]:
    loc = {e.key: e.value for e in i.external_data}
    print("  ", i.name, list(i.dims), TensorProto.DataType.Name(i.data_type), loc)
# node attributes of contrib ops: print first of each op type
seen = set()
for n in g.node:
    key = (n.domain, n.op_type)
    if key in seen:
        continue
    seen.add(key)
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    attrs = {
        k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items() if not isinstance(v, onnx.TensorProto)
    }
    print(
        f"[{n.domain or 'ai.onnx'}] {n.op_type} name={n.name}\n    in={list(n.input)}\n"
        f"    out={list(n.output)}\n    attrs={attrs}"
    )
# matmul weights
mm = [n for n in g.node if n.op_type in ("MatMul", "MatMulNBits", "Gemm")]
print("weighted matmuls:")
shapes = collections.Counter()
for n in mm:
    ws = [x for x in n.input if x in inits]
    for w in ws:
        shapes[(n.op_type, tuple(inits[w].dims))] += 1
for k, v in shapes.items():
    print("  ", k, v)
for n in mm[:8] + mm[-2:]:
    print("  ", n.op_type, n.name, list(n.input))
gath = [n for n in g.node if n.op_type in ("Gather", "GatherBlockQuantized")]
for n in gath:
    print("gather", n.op_type, n.name, list(n.input), [list(inits[x].dims) for x in n.input if x in inits])
# value_info count
print("value_info", len(g.value_info))
