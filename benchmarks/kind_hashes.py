"""Hashes of the quantized bytes and stated costs of a few models, one per layer kind (a CNN, a
depthwise Conv, a bidirectional LSTM between MatMuls, an MLP calibrated in several passes): run
before and after a refactoring that must not change any code or statistic, and compare the lines.

    PYTHONPATH=$PWD python benchmarks/kind_hashes.py
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from runs import quantize  # noqa: E402
from test_conv import conv_model  # noqa: E402
from test_recurrent import feeds, recurrent_model  # noqa: E402


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def cases() -> dict[str, tuple[onnx.ModelProto | Path, object, dict[str, object]]]:
    cnn = ROOT / "models" / "mnist_cnn.onnx"
    mlp = ROOT / "models" / "mnist_mlp.onnx"
    lstm = recurrent_model(direction="bidirectional", sequence_lens=True, initial_h="input", named_y=False,
                           before=True, after=True)
    depthwise = conv_model(channels=(4, 8), group=4, pads=[1, 1, 1, 1], second=True)
    x = np.random.default_rng(3).standard_normal((16, 4, 9, 8)).astype(np.float32)
    return {
        "mnist_cnn 3 bits": (cnn, npz(ROOT / "models" / "mnist_cnn.calib.npz"), dict(bits=3)),
        "mnist_cnn 4 bits uint8 ort sequential": (cnn, npz(ROOT / "models" / "mnist_cnn.calib.npz"),
                                                  dict(bits=4, activations="uint8", format="ort", sequential=True)),
        "depthwise 2 bits sequential bias correction": (depthwise, {"x": x},
                                                        dict(bits=2, sequential=True, bias_correction=True)),
        "lstm 2 bits sequential bias correction": (lstm, feeds(lstm), dict(bits=2, sequential=True,
                                                                           bias_correction=True)),
        "lstm 4 bits uint8": (lstm, feeds(lstm), dict(bits=4, activations="uint8")),
        "mnist_mlp 2 bits in passes": (mlp, npz(ROOT / "models" / "mnist_mlp.calib.npz"),
                                       dict(bits=2, max_memory=0.0245)),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name, (model, calibration, options) in cases().items():
            out = Path(folder) / "q.onnx"
            report = quantize(model, out, calibration=calibration, speed=False, **options)
            costs = repr([(r.name, r.cost_rtn, r.cost_solved, r.cost_bias_corrected) for r in report.layers])
            print(f"{name}: model {hashlib.sha256(out.read_bytes()).hexdigest()[:16]} "
                  f"costs {hashlib.sha256(costs.encode()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
