#!/bin/bash
# Builder variants (run from /work/llm). Each: wall time + peak RSS into build_<name>.time
B="venv/bin/python -m onnxruntime_genai.models.builder -i /work/llm/hf -e cpu -c /work/llm/cache"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
v() { name=$1; shift; /usr/bin/time -f "%e s wall, %M KB peak" -o build_$name.time $B -o /work/llm/genai_$name "$@" > build_$name.log 2>&1; echo "$name rc=$? $(cat build_$name.time | tail -1)"; }
v fp32_untied -p fp32 --extra_options shared_embeddings=false
v int4_b128 -p int4 --extra_options block_size=128
v int4_kquant -p int4 --extra_options algo_config=k_quant
v fp32_fused -p fp32 --extra_options fuse_mlp_gate_up=true
v fp16 -p fp16
