"""Greedy generation speed of genai model folders in og.Generator: prefill and decode tokens/s.

usage: python genai_speed.py FOLDER [FOLDER ...] [--new 64] [--prompt-tokens N] [--repeat 3] [--threads T]
Prefill = time of the first generate_next_token() call after append_tokens (the prompt pass);
decode = (new-1) further tokens / their time. Median over --repeat runs; folders measured in turn.
"""

import argparse
import json
import statistics
import time

import onnxruntime_genai as og

PROMPT = (
    "The history of the English language began with the arrival of three Germanic tribes who "
    "invaded Britain during the 5th century AD. These tribes, the Angles, the Saxons and the Jutes, "
    "crossed the North Sea from what today is Denmark and northern Germany."
)


def load(folder, threads):
    cfg = og.Config(folder)
    cfg.clear_providers()  # cpu
    if threads:
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(cfg)
    return model, og.Tokenizer(model)


def run(model, tok, new, prompt_ids):
    ids = prompt_ids if prompt_ids is not None else list(tok.encode(PROMPT))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new, min_length=len(ids) + new)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    t1 = time.perf_counter()
    out = []
    times = []
    while not gen.is_done():
        s = time.perf_counter()
        gen.generate_next_token()
        times.append(time.perf_counter() - s)
        out.append(int(gen.get_next_tokens()[0]))
    # append_tokens runs the prompt pass in og 0.18 (it computes logits); the first generate_next_token
    # then only samples. Count prefill = append_tokens time (+ first token's time).
    prefill = (t1 - t0) + times[0]
    decode = sum(times[1:])
    return dict(
        prompt_tokens=len(ids),
        new_tokens=len(out),
        prefill_s=prefill,
        prefill_tok_s=len(ids) / prefill,
        decode_s=decode,
        decode_tok_s=(len(out) - 1) / decode if decode else float("nan"),
        text=tok.decode(out),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--prompt-tokens", type=int, default=0, help="use N copies of a fixed token id sequence instead of PROMPT"
    )
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    results = {}
    loaded = {f: load(f, a.threads) for f in a.folders}
    for f in a.folders:  # warm-up: first run pays weight prepacking and allocations
        run(*loaded[f], 8, None)
    allruns = {f: [] for f in a.folders}
    for _ in range(a.repeat):  # interleaved, so a busy machine hits every model alike
        for f in a.folders:
            allruns[f].append(run(*loaded[f], a.new, None))
    for f in a.folders:
        runs = allruns[f]
        med = {
            k: statistics.median(r[k] for r in runs) for k in ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s")
        }
        med.update(prompt_tokens=runs[0]["prompt_tokens"], new_tokens=runs[0]["new_tokens"], text=runs[0]["text"])
        results[f] = med
        print(
            f"{f}: prompt {med['prompt_tokens']} tok, prefill {med['prefill_tok_s']:.1f} tok/s "
            f"({med['prefill_s'] * 1000:.0f} ms), "
            f"decode {med['decode_tok_s']:.1f} tok/s over {med['new_tokens'] - 1} tokens",
            flush=True,
        )
        print("   ", repr(med["text"][:200]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
