"""PNG figures of a comparison (matplotlib is an optional extra: pip install 'onnx-qubo[plot]')."""

from __future__ import annotations

import io
from collections.abc import Collection
from pathlib import Path

from ..core.errors import OptionError
from ..graph.files import writable_path, write_atomically
from .compare import Comparison

PLOT_FILES = ("accuracy_vs_bits.png", "cost_vs_accuracy.png")


def require_matplotlib():
    """matplotlib.pyplot on a file-only backend, or a clear error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("{plots} needs matplotlib: pip install 'onnx-qubo[plot]'", "plots") from None
    return plt


def write_plots(comparison: Comparison, directory: Path, reads: Collection[Path] = ()) -> list[Path]:
    """accuracy_vs_bits.png, and cost_vs_accuracy.png when the comparison has samples."""
    plt = require_matplotlib()
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for scale, solver in sorted({(r.scale, r.solver) for r in comparison.rows}):
        rows = sorted((r for r in comparison.rows if (r.scale, r.solver) == (scale, solver)), key=lambda r: r.bits)
        ax.plot([r.bits for r in rows], [100 * r.accuracy for r in rows], marker="o", label=f"{solver}, {scale}")
    ax.axhline(100 * comparison.float_accuracy, color="gray", linestyle="--", label="float")
    ax.set(xlabel="weight bits", ylabel=f"{comparison.metric} (%)", title=comparison.model)
    ax.legend()
    fig.tight_layout()
    written.append(directory / PLOT_FILES[0])
    _save(fig, written[-1], reads)
    plt.close(fig)

    correlations = comparison.correlations()
    if correlations:
        fig, axes = plt.subplots(1, len(correlations), figsize=(4 * len(correlations), 3.6), squeeze=False)
        for ax, (bits, r) in zip(axes[0], correlations.items()):
            points = [s for s in comparison.samples if s.bits == bits]
            ax.scatter([s.qubo_cost for s in points], [100 * s.accuracy for s in points], s=14)
            ax.set(xlabel="total QUBO cost", ylabel=f"{comparison.metric} (%)",
                   title=f"int{bits}: r = {'n/a' if r is None else f'{r:+.2f}'}")
        fig.tight_layout()
        written.append(directory / PLOT_FILES[1])
        _save(fig, written[-1], reads)
        plt.close(fig)
    return written


def _save(fig, path: Path, reads: Collection[Path]) -> None:
    """A figure as PNG, written like every output: never over a file the run reads, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_atomically(writable_path(path, reads=reads, what="plot"), buffer.getvalue(), "plot")
