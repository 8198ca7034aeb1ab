"""Perplexity of a genai-built model folder's model.onnx with plain onnxruntime, on held-out text.

usage: python ppl.py FOLDER [FOLDER ...] [--windows 16] [--length 256] [--text pydoc|PATH] [--hf HF_FOLDER]

Text: 'pydoc' = the Python stdlib's pydoc_data.topics (the language reference, ~465k chars of
English prose with code), topics in sorted order; tokenized with the folder's tokenizer.json
(the `tokenizers` package). Windows: --windows non-overlapping windows of --length tokens, taken
evenly from the SECOND half of the token stream (the first half is left for calibration).
Feeds: input_ids [1, L] int64, attention_mask ones [1, L] int64, every past_key_values.* as an
empty past [1, kv_heads, 0, head_size] (head_size from genai_config.json). Only 'logits' is
fetched. Cross entropy of positions 0..L-2 predicting 1..L-1, log-softmax in chunks of 64 rows.
--hf also scores the same windows with transformers (torch, float32) as an independent reference.
"""

import argparse
import json
import math
import os
import time

import numpy as np


def text_tokens(folder, text):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    if text == "pydoc":
        import pydoc_data.topics as t

        s = "\n\n".join(t.topics[k] for k in sorted(t.topics))
    else:
        s = open(text, encoding="utf-8").read()
    return np.array(tok.encode(s, add_special_tokens=False).ids, dtype=np.int64)


def windows(ids, n, length):
    half = ids[len(ids) // 2 :]
    stride = (len(half) - length) // max(n - 1, 1)
    assert stride >= length, f"text too short: {len(half)} tokens for {n} x {length}"
    return np.stack([half[i * stride : i * stride + length] for i in range(n)])


def nll_of_logits(logits, targets, chunk=64):
    """Sum of -log p(target) over rows, log-softmax in chunks (logits [T, V] float32)."""
    total = 0.0
    for s in range(0, len(targets), chunk):
        z = logits[s : s + chunk].astype(np.float64)
        m = z.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
        total += float((lse - z[np.arange(len(z)), targets[s : s + chunk]]).sum())
    return total


def onnx_ppl(folder, wins, threads):
    import onnxruntime as ort

    cfg = json.load(open(os.path.join(folder, "genai_config.json")))["model"]["decoder"]
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    t = time.time()
    sess = ort.InferenceSession(
        os.path.join(folder, cfg.get("filename", "model.onnx")), so, providers=["CPUExecutionProvider"]
    )
    load_s = time.time() - t
    kv, hs = cfg["num_key_value_heads"], cfg["head_size"]
    past = {
        i.name: np.zeros((1, kv, 0, hs), np.float32) for i in sess.get_inputs() if i.name.startswith("past_key_values")
    }
    nll, count, t = 0.0, 0, time.time()
    for w in wins:
        feeds = {"input_ids": w[None], "attention_mask": np.ones((1, len(w)), np.int64), **past}
        logits = sess.run(["logits"], feeds)[0][0]
        nll += nll_of_logits(logits[:-1], w[1:])
        count += len(w) - 1
    return math.exp(nll / count), load_s, time.time() - t


def hf_ppl(hf, wins):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logits = model(torch.from_numpy(w[None])).logits[0].numpy()
            nll += nll_of_logits(logits[:-1], w[1:])
            count += len(w) - 1
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--text", default="pydoc")
    ap.add_argument("--hf", default=None)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    ids = text_tokens(a.folders[0], a.text)
    wins = windows(ids, a.windows, a.length)
    print(f"text {a.text}: {len(ids)} tokens; {a.windows} windows x {a.length} from the second half", flush=True)
    for f in a.folders:
        p, load_s, run_s = onnx_ppl(f, wins, a.threads)
        print(f"{f}: perplexity {p:.3f}  (session {load_s:.1f} s, {a.windows} windows {run_s:.1f} s)", flush=True)
    if a.hf:
        print(f"{a.hf} (transformers, torch fp32): perplexity {hf_ppl(a.hf, wins):.3f}", flush=True)


if __name__ == "__main__":
    main()
