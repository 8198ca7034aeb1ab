"""Where a streaming model's low-bit error comes from: silero-vad at 3 and 4 bits (issue 19).

silero-vad carries an LSTM state from one 512-sample chunk to the next; onnx-qubo calibrates
each layer on single chunks fed the float model's states. This script quantizes it (default
flags, blocks of 32) on calibration sets of several sizes, all scored on the same evaluation
clips, and scores every quantized model twice: streamed as deployed (its own state carried) and
"teacher-forced" (fed, at every chunk, the state the float model's stream had there). The gap
between the two is the error the carried state adds; the rows per calibration size say how much
of the 3-bit/4-bit difference is the calibration's size. At one calibration size (``--study-clips``)
and the narrowest width, two more tries: calibrating on the states of the quantized model's own
stream (closed loop: quantize, stream the calibration clips through the result, calibrate again on
the states it carried), and each quantized layer one bit wider alone (is one layer the culprit?).

    python benchmarks/streaming_state.py --calib-clips 8,32,64,128 --study-clips 32 --eval-clips 256 --out FILE.md

The model and the audio are real_models.py's (``silero-vad``: the package's op18 If-less model,
synthesized speech-like clips of 16 chunks); the package is fetched into ``--cache`` with pip.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's onnx_qubo, not an installed copy
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnxruntime as ort  # noqa: E402
import real_models  # noqa: E402

import onnx_qubo  # noqa: E402

CHUNKS = 16  # per clip (real_models.prep_silero)


def stream(session: ort.InferenceSession, clips: np.ndarray, forced: list[np.ndarray] | None = None
           ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Speech probabilities [clips, chunks] of ``clips`` streamed chunk by chunk (64 samples of
    context, the state carried, or with ``forced`` the given state fed at each chunk), and the
    state each chunk was fed."""
    count = len(clips)
    state = np.zeros((2, count, 128), np.float32)
    context = np.zeros((count, 64), np.float32)
    probs, states = [], []
    for c in range(CHUNKS):
        x = np.concatenate([context, clips[:, c * 512:(c + 1) * 512]], axis=1)
        if forced is not None:
            state = forced[c]
        states.append(state)
        out, state = session.run(None, {"input": x, "state": state, "sr": np.array(16000, np.int64)})
        probs.append(out[:, 0])
        context = x[:, -64:]
    return np.stack(probs, 1), states


def calibration_states(session: ort.InferenceSession, inputs: np.ndarray, per_chunk: int) -> np.ndarray:
    """The states [2, N, 128] a model's own stream carries into each calibration chunk (``inputs``
    chunk-major: chunk c of clip b at c * per_chunk + b, context included)."""
    state = np.zeros((2, per_chunk, 128), np.float32)
    states = []
    for c in range(CHUNKS):
        states.append(state)
        _, state = session.run(None, {"input": inputs[c * per_chunk:(c + 1) * per_chunk], "state": state,
                                      "sr": np.array(16000, np.int64)})
    return np.concatenate(states, axis=1)


def scores(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Decisions flipped at 0.5, the largest probability change, the relative error."""
    return {"flips": float(np.mean((reference > 0.5) != (got > 0.5))),
            "max": float(np.abs(reference - got).max()),
            "error": float(np.linalg.norm(got - reference) / np.linalg.norm(reference))}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib-clips", default="8,32,64,128", help="calibration sizes in clips of 16 chunks")
    parser.add_argument("--study-clips", type=int, default=32, help="calibration size of the two tries")
    parser.add_argument("--eval-clips", type=int, default=256)
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("ONNX_QUBO_REALMODELS_CACHE",
                                                                          Path.home() / ".cache/onnx-qubo-rm")))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.calib_clips.split(",")]
    widths = [int(b) for b in args.bits.split(",")]
    load_before, started = os.getloadavg(), time.time()
    spec = real_models.MODELS["silero-vad"]
    target = real_models.install(spec.package, spec.version, args.cache)
    with tempfile.TemporaryDirectory(prefix="streaming-state-") as folder:
        work = Path(folder)
        prepared = real_models.prep_silero(spec, target, CHUNKS * max(sizes), CHUNKS * args.eval_clips, work)
        inputs, states = prepared.calib["input"], prepared.calib["state"]  # chunk-major: chunk c of clip b at c*B+b
        per_chunk = len(inputs) // CHUNKS
        clips = prepared.evaluation["clips"]
        reference, float_states = stream(session(prepared.path), clips)
        rows: list[tuple[str, int, int, dict, dict]] = []

        def calibration_of(size: int) -> dict[str, np.ndarray]:
            take = np.array([c * per_chunk + b for c in range(CHUNKS) for b in range(size)])
            return {"input": inputs[take], "state": states[:, take], "sr": prepared.calib["sr"]}

        def row(label: str, size: int, bits: int, calibration: dict[str, np.ndarray], **options) -> tuple[Path, list]:
            config = onnx_qubo.QuantizeConfig.from_flat({"bits": bits, "granularity": "block", "block_size": 32,
                                                         **options})
            out = work / f"b{bits}_c{size}_{len(rows)}.onnx"
            report = onnx_qubo.run(str(prepared.path), str(out), config, calibration=calibration,
                                   evaluation=calibration).report
            quantized = session(out)
            free = scores(reference, stream(quantized, clips)[0])
            forced = scores(reference, stream(quantized, clips, float_states)[0])
            rows.append((label, size, bits, free, forced))
            print(f"{label}, calibration {size * CHUNKS} chunks, {bits} bits: streamed {free}, teacher-forced {forced}",
                  flush=True)
            return out, report.layers

        made = {(size, bits): row("default", size, bits, calibration_of(size)) for size in sizes for bits in widths}
        bits, calibration = min(widths), calibration_of(args.study_clips)
        first, layers = made.get((args.study_clips, bits)) or row("default", args.study_clips, bits, calibration)
        own = dict(calibration, state=calibration_states(session(first), calibration["input"], args.study_clips))
        row("calibrated on its own stream's states", args.study_clips, bits, own)
        for layer in [r.name for r in layers if r.bits == bits]:  # the layers at the width (not the small ones at 8)
            row(f"{layer.rsplit('/', 1)[-1]} at {bits + 1} bits", args.study_clips, bits, calibration,
                layer_bits={layer: bits + 1})
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    lines = [
        "# silero-vad: calibration size and the carried state (`benchmarks/streaming_state.py`)", "",
        f"Command: `python benchmarks/streaming_state.py {' '.join(sys.argv[1:])}` "
        f"({time.time() - started:.0f} s)  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; machine {platform.machine()}, "
        f"{os.cpu_count()} cores (shared), load average {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after  ",
        f"Versions: onnx-qubo {head}, onnxruntime {ort.__version__}, numpy {np.__version__}", "",
        f"`silero-vad=={spec.version}` (`{spec.member}`), default flags with `--bits B --granularity block "
        f"--block-size 32`; evaluation: the same {len(clips)} clips ({len(clips) * CHUNKS} decisions) for every row. "
        "*Streamed*: the quantized model carries its own state, as deployed; *teacher-forced*: it is fed the float "
        "model's state at every chunk, so only one chunk's error is left.", "",
        "| run | calibration chunks | bits | flips (streamed) | flips (teacher-forced) | max change (streamed) | "
        "rel. err. (streamed) | rel. err. (teacher-forced) |",
        "|---|---|---|---|---|---|---|---|"]
    for label, size, bits, free, forced in rows:
        lines.append(f"| {label} | {size * CHUNKS} | {bits} | {free['flips']:.4f} | {forced['flips']:.4f} | "
                     f"{free['max']:.3f} | {free['error']:.4f} | {forced['error']:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
