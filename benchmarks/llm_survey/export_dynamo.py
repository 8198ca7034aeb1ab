"""torch.onnx.export(dynamo=True) of the HF folder: opset 18, input_ids only -> logits, external data.

usage: python export_dynamo.py [HF=/work/llm/hf] [OUT=/work/llm/dynamo/model.onnx]
No KV cache (use_cache=False): one input `input_ids` [batch, seq] int64, one output `logits`.
(The survey's script, kept as run; only its imports were split for the linter.)
"""

import collections
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import AutoModelForCausalLM

hf = sys.argv[1] if len(sys.argv) > 1 else "/work/llm/hf"
out = sys.argv[2] if len(sys.argv) > 2 else "/work/llm/dynamo/model.onnx"
os.makedirs(os.path.dirname(out), exist_ok=True)
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
model.config.use_cache = False


class Wrap(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


ids = torch.randint(0, model.config.vocab_size, (1, 16))
t = time.time()
batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=8192)
prog = torch.onnx.export(Wrap(model), (ids,), None, dynamo=True, opset_version=18,
                         input_names=["input_ids"], output_names=["logits"],
                         dynamic_shapes={"input_ids": {0: batch, 1: seq}})
prog.optimize()
prog.save(out, external_data=True)
print("exported in", round(time.time() - t, 1), "s to", out)
m = onnx.load(out, load_external_data=False)
print(collections.Counter(n.op_type for n in m.graph.node).most_common(25))
print("opsets", [(o.domain, o.version) for o in m.opset_import])
print("inputs", [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input])
inits = {i.name for i in m.graph.initializer}
mm = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and any(x in inits for x in n.input)]
total = sum(n.op_type in ("MatMul", "Gemm") for n in m.graph.node)
print("MatMul/Gemm with an initializer input:", len(mm), "of", total)
# check against torch
s = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
x = torch.randint(0, model.config.vocab_size, (1, 32))
with torch.no_grad():
    ref = model(x).logits.numpy()
got = s.run(None, {"input_ids": x.numpy()})[0]
print("max |onnx - torch| logits:", float(np.abs(got - ref).max()))
