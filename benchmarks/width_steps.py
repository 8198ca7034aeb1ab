"""What one bit of weight width buys a sentence encoder, from a width sweep (issue 19).

Reads the rows benchmarks/real_models.py wrote into its work folder (``rows.jsonl``) for
``qubo-bN-blk32`` configs at several widths, and prints per width the task metric, the
nearest-neighbour agreement and the output error; per step of one bit the error's ratio and the
metrics' gain; and a least-squares fit of the neighbour disagreement against the error,
``1 - agreement = c * error^alpha`` over the widths given, with the error that fit says 3 bits
would need for their agreement to come within ``--points`` of 4 bits'.

    python benchmarks/real_models.py --models minilm-docs \\
        --configs qubo-b2-blk32,qubo-b3-blk32,qubo-b4-blk32,qubo-b5-blk32,qubo-b6-blk32,qubo-b8-blk32 \\
        --calib 64 --eval 512 --no-extra --work WORK
    python benchmarks/width_steps.py WORK/rows.jsonl --fit 3,4,5,6
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

WIDTH = re.compile(r"^qubo-b(\d+)-blk32$")


def widths(rows_path: Path) -> tuple[str, dict[int, dict]]:
    """The model's name and its last row per width (a later run of a config replaces an earlier)."""
    by_width: dict[int, dict] = {}
    model = ""
    for line in rows_path.read_text().splitlines():
        row = json.loads(line)
        match = WIDTH.match(row.get("config", ""))
        if match and row.get("ok"):
            by_width[int(match.group(1))] = row
            model = row["model"]
    if len(by_width) < 2:
        raise SystemExit(f"{rows_path}: fewer than two qubo-bN-blk32 rows")
    return model, dict(sorted(by_width.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", type=Path, nargs="+", help="real_models.py's rows.jsonl, one per model")
    ap.add_argument("--fit", default="3,4,5,6", help="the widths the power fit uses")
    ap.add_argument("--points", type=float, default=0.02, help="the agreement gap to ask of 3 bits against 4")
    args = ap.parse_args()
    fit = [int(b) for b in args.fit.split(",")]
    for path in args.rows:
        model, rows = widths(path)
        print(f"## {model} ({path})\n")
        print("| bits | cosine | neighbours | rel. err. | error ratio to one bit more | cosine gain | neighbour gain |")
        print("|---|---|---|---|---|---|---|")
        for bits, row in rows.items():
            more = rows.get(bits + 1)
            step = ("-", "-", "-") if more is None else (
                f"{row['rel_err'] / more['rel_err']:.2f}", f"{100 * (more['fidelity'] - row['fidelity']):.1f}",
                f"{100 * (more['fidelity2'] - row['fidelity2']):.1f}")
            print(f"| {bits} | {row['fidelity']:.4f} | {row['fidelity2']:.4f} | {row['rel_err']:.4g} | "
                  + " | ".join(step) + " |")
        used = [b for b in fit if b in rows]
        error = np.log([rows[b]["rel_err"] for b in used])
        disagreement = np.log([1 - rows[b]["fidelity2"] for b in used])
        alpha, log_c = np.polyfit(error, disagreement, 1)
        print(f"\nfit over {used} bits: 1 - neighbours = {np.exp(log_c):.3g} * error^{alpha:.3f}")
        if 3 in rows and 4 in rows:
            target = 1 - rows[4]["fidelity2"] + args.points
            needed = float(np.exp((np.log(target) - log_c) / alpha))
            print(f"3 bits within {100 * args.points:g} points of 4 bits' neighbours ({rows[4]['fidelity2']:.4f}): "
                  f"error at most {needed:.3g} by the fit, {needed / rows[4]['rel_err']:.2f}x 4 bits' "
                  f"({rows[4]['rel_err']:.4g}); measured at 3 bits {rows[3]['rel_err']:.4g} "
                  f"({rows[3]['rel_err'] / rows[4]['rel_err']:.2f}x)\n")


if __name__ == "__main__":
    main()
