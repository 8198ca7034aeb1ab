"""Does calibrating each layer of a decoder LM on the already quantized prefix (GPTQ's order) lower
its perplexity at 3 bits? A torch harness around onnx-qubo's own layer solve.

    $TORCH_PY benchmarks/llm_sequential.py HF_DIR CALIB.npz EVAL.npz --bits 3 [--sequential]

HF_DIR: a Llama-architecture checkpoint (the LM benchmark's ``hf`` folder, SmolLM2-135M); CALIB.npz
and EVAL.npz: its ``input_ids`` windows. Each transformer block is run on the hidden states of the
calibration windows; each of its MatMul groups (q/k/v, o, gate/up, down) is quantized by
``onnx_qubo.api.quantize`` on a one-MatMul ONNX model, calibrated on that group's inputs (blocks of
32 along the inputs, the grid chosen per layer as in the CLI's default; the head at 4 bits, which
the tied embedding shares), and its dequantized weight written back. Without ``--sequential`` every
input is the float model's (what the CLI does on a language model); with it, each group's inputs
come from the block whose earlier groups, and the blocks before it, are already quantized. The target
stays the float layer on those inputs (GPTQ's), not the float model's output. Activations stay
float (the CLI's ``--ort-accuracy-level 0``). Prints the perplexity and writes a JSON record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rotation import dequantized  # noqa: E402

from onnx_qubo import api  # noqa: E402
from onnx_qubo.config import QuantizeConfig  # noqa: E402

BATCH = 8  # windows per torch forward


class Captured(Exception):
    """Raised by a hook once the input it waits for is taken: the rest of the block is not run."""


def one_matmul(weight: np.ndarray) -> onnx.ModelProto:
    """x [N, f] -> MatMul(x, weight^T) -> y: one layer for onnx-qubo to quantize."""
    n, f = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T, np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def quantized_weight(weight: np.ndarray, inputs: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, float]:
    """The [n, f] weight onnx-qubo writes for ``weight`` calibrated on ``inputs`` [N, f], and its cost."""
    config = QuantizeConfig.from_flat(bits=bits, granularity="block", block_size=block)
    result = api.quantize(one_matmul(weight), config, calibration={"x": inputs})
    (value,) = dequantized(result.model).values()
    return value.T.astype(np.float32), sum(layer.final_cost for layer in result.report.layers)


def perplexity(model, windows: np.ndarray) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), BATCH):
            ids = torch.from_numpy(windows[start:start + BATCH].astype(np.int64))
            logits = model(ids).logits[:, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="sum")
            total, count = total + float(nll), count + ids[:, 1:].numel()
    return math.exp(total / count)


def run_block(model, block, hidden: list[torch.Tensor], hook_module=None) -> list[torch.Tensor]:
    """The block's outputs for each batch of hidden states, as the model runs it (its causal mask and
    rotary embeddings); with ``hook_module``, that module's inputs [tokens, f] instead (the block
    stops there)."""
    from transformers.masking_utils import create_causal_mask

    outputs = []
    for h in hidden:
        positions = torch.arange(h.shape[1])[None]
        mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=positions)
        run = dict(attention_mask=mask, position_ids=positions,
                   position_embeddings=model.model.rotary_emb(h, position_ids=positions))
        if hook_module is None:
            outputs.append(block(h, **run))
            continue
        taken: list[torch.Tensor] = []

        def take(_module, args, taken=taken):
            taken.append(args[0].detach().reshape(-1, args[0].shape[-1]))
            raise Captured

        handle = hook_module.register_forward_pre_hook(take)
        try:
            block(h, **run)
        except Captured:
            pass
        finally:
            handle.remove()
        outputs.append(taken[0])
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("eval", type=Path)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--windows", type=int, default=64, help="calibration windows used")
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--only", default=None,
                        help="comma-separated MatMuls to quantize (q,k,v,o,gate,up,down,head); the others stay float")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    started, load = time.perf_counter(), os.getloadavg()
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval().requires_grad_(False)
    calib = np.load(args.calib)["input_ids"][:args.windows]
    evaluation = np.load(args.eval)["input_ids"]
    float_ppl = perplexity(model, evaluation)
    print(f"float perplexity {float_ppl:.3f}", flush=True)
    inner = model.model
    costs: dict[str, float] = {}
    only = set(args.only.split(",")) if args.only else {"q", "k", "v", "o", "gate", "up", "down", "head"}
    with torch.no_grad():
        hidden = [inner.embed_tokens(torch.from_numpy(calib[s:s + BATCH].astype(np.int64)))
                  for s in range(0, len(calib), BATCH)]
        for index, block in enumerate(inner.layers):
            attention, mlp = block.self_attn, block.mlp
            groups = [[attention.q_proj, attention.k_proj, attention.v_proj], [attention.o_proj],
                      [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]]
            names = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
            if not args.sequential:  # every group's inputs from the float block, before any is quantized
                inputs = [torch.cat(run_block(model, block, hidden, group[0])).numpy() if only & set(labels) else None
                          for group, labels in zip(groups, names)]
                hidden = run_block(model, block, hidden)
            for g, (group, labels) in enumerate(zip(groups, names)):
                if not only & set(labels):
                    continue
                x = inputs[g] if not args.sequential else torch.cat(run_block(model, block, hidden, group[0])).numpy()
                for module, label in zip(group, labels):
                    if label not in only:
                        continue
                    weight, cost = quantized_weight(module.weight.detach().numpy(), x, args.bits, args.block_size)
                    module.weight.copy_(torch.from_numpy(weight))
                    costs[f"{index}.{label}"] = cost
            if args.sequential:
                hidden = run_block(model, block, hidden)
            print(f"block {index}: {time.perf_counter() - started:.0f} s", flush=True)
        if "head" in only:
            final = torch.cat([inner.norm(h).reshape(-1, h.shape[-1]) for h in hidden]).numpy()
            head, cost = quantized_weight(model.lm_head.weight.detach().numpy(), final, max(args.bits, 4),
                                          args.block_size)
            model.lm_head.weight.copy_(torch.from_numpy(head))  # tied: the embedding reads the same codes
            costs["head"] = cost
    ppl = perplexity(model, evaluation)
    record = {"command": " ".join(sys.argv), "bits": args.bits, "block_size": args.block_size,
              "sequential": args.sequential, "only": sorted(only), "calibration_windows": len(calib),
              "evaluation_windows": len(evaluation),
              "float_perplexity": float_ppl, "perplexity": ppl, "cost_sum": sum(costs.values()), "costs": costs,
              "seconds": round(time.perf_counter() - started), "load_before": load, "load_after": os.getloadavg(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"perplexity {ppl:.3f} (float {float_ppl:.3f}), layer costs {record['cost_sum']:.1f}, "
          f"{record['seconds']} s")
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
