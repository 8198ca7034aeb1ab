"""onnxruntime's own weight-only quantizers on the genai fp32 folder -> a complete genai folder.

usage: python ort_rtn.py SRC_FOLDER OUT_FOLDER --algo rtn|hqq|default [--block 32] [--bits 4] [--symmetric]
Copies genai_config.json and tokenizer files; writes model.onnx + model.onnx.data.
"""

import argparse
import logging
import os
import shutil
import time

import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    HQQWeightOnlyQuantConfig,
    MatMulNBitsQuantizer,
    RTNWeightOnlyQuantConfig,
)

logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("out")
ap.add_argument("--algo", default="rtn")
ap.add_argument("--block", type=int, default=32)
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--symmetric", action="store_true")
ap.add_argument("--accuracy-level", type=int, default=4)
a = ap.parse_args()
t = time.time()
model = onnx.load(os.path.join(a.src, "model.onnx"))  # with external data (540 MB)
if a.algo == "rtn":
    cfg = RTNWeightOnlyQuantConfig()  # per-channel RTN in QDQ? see below
elif a.algo == "hqq":
    cfg = HQQWeightOnlyQuantConfig(block_size=a.block, bits=a.bits)
else:
    cfg = DefaultWeightOnlyQuantConfig(
        block_size=a.block, is_symmetric=a.symmetric, accuracy_level=a.accuracy_level, bits=a.bits
    )
q = (
    MatMulNBitsQuantizer(
        model,
        block_size=a.block,
        is_symmetric=a.symmetric,
        accuracy_level=a.accuracy_level,
        algo_config=cfg,
        bits=a.bits,
    )
    if a.algo != "default"
    else MatMulNBitsQuantizer(model, algo_config=cfg)
)
q.process()
os.makedirs(a.out, exist_ok=True)
for f in os.listdir(a.src):
    if f not in ("model.onnx", "model.onnx.data"):
        shutil.copy(os.path.join(a.src, f), a.out)
q.model.save_model_to_file(os.path.join(a.out, "model.onnx"), use_external_data_format=True)
print(f"{a.algo} bits {a.bits} block {a.block} symmetric {a.symmetric}: {time.time() - t:.1f} s")
