"""Make the tiny onnxruntime-genai model of the tests: a random-weight Llama (2 layers, hidden 64,
4 heads, 2 KV heads of 16, MLP 128, context 256, tied embeddings, seed 0) built by
onnxruntime-genai's model builder (``-p fp32 -e cpu``, or ``-p fp16`` with ``--precision fp16``)
from a local Hugging Face folder.

Writes, beside this script, ``tiny_lm/`` (``tiny_lm_fp16/``): the builder's folder (model.onnx + model.onnx.data,
genai_config.json, tokenizer files), plus ``model.calib.npz`` (32 windows of 64 tokens) and
``model.eval.npz`` (16 windows) of ``input_ids`` cut from an English text. The weights are larger
than transformers' initialization (embeddings std 0.5, projections std 0.3, RMSNorm weights
1 + N(0, 0.1)), so attention and the MLP move the residual stream and a wrong kernel shows in the
logits. The tokenizer is a real byte-level BPE (``--tokenizer``, a Hugging Face folder such as
SmolLM-135M's) cut to its first ``--vocab`` ids: GPT-2-style vocabularies number merges in rank
order, so keeping the ids < V and the merges whose result is < V is a valid smaller tokenizer.

Needs torch, transformers and onnxruntime-genai (only here). Usage:
    python models/make_tiny_lm.py --tokenizer HF_FOLDER [--text /usr/share/common-licenses/GPL-3]
    python models/make_tiny_lm.py --tokenizer HF_FOLDER --precision fp16  # the same weights, half precision
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WINDOW, CALIB, EVAL = 64, 32, 16


def cut_tokenizer(source: Path, target: Path, vocab: int) -> None:
    """The tokenizer of ``source`` cut to its first ``vocab`` ids, written to ``target``."""
    spec = json.loads((source / "tokenizer.json").read_text())
    full = spec["model"]["vocab"]
    spec["model"]["vocab"] = {s: i for s, i in full.items() if i < vocab}
    kept = []
    for merge in spec["model"]["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        if a in spec["model"]["vocab"] and b in spec["model"]["vocab"] and full.get(a + b, vocab) < vocab:
            kept.append(merge)
    spec["model"]["merges"] = kept
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < vocab]
    (target / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["model_max_length"] = 256
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a Hugging Face folder with tokenizer.json")
    parser.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="the builder's -p")
    parser.add_argument("--out", type=Path, help="default: tiny_lm/ (fp32) or tiny_lm_fp16/ beside this script")
    args = parser.parse_args()
    args.out = args.out or HERE / ("tiny_lm" if args.precision == "fp32" else "tiny_lm_fp16")

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as work:
        hf = Path(work) / "hf"
        hf.mkdir()
        cut_tokenizer(args.tokenizer, hf, args.vocab)
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
                             eos_token_id=2, pad_token_id=2, hidden_act="silu", architectures=["LlamaForCausalLM"])
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, 0.5)
            for name, p in model.named_parameters():
                if name.endswith("proj.weight"):
                    p.normal_(0.0, 0.3)
                elif "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        model.tie_weights()
        model.save_pretrained(hf)
        shutil.rmtree(args.out, ignore_errors=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(args.out),
                        "-p", args.precision, "-e", "cpu", "-c", str(Path(work) / "cache")], env=env, check=True,
                       capture_output=True)
        ids = AutoTokenizer.from_pretrained(hf)(args.text.read_text())["input_ids"]
    windows = np.asarray(ids[:(CALIB + EVAL) * WINDOW], np.int64).reshape(CALIB + EVAL, WINDOW)
    np.savez(args.out / "model.calib.npz", input_ids=windows[:CALIB])
    np.savez(args.out / "model.eval.npz", input_ids=windows[CALIB:])
    for path in sorted(args.out.iterdir()):
        print(f"{path.name:28s} {path.stat().st_size:>10,d} bytes")


if __name__ == "__main__":
    main()
