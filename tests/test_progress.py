"""Progress on stderr (progress.py): bars on a terminal, at most a line every 30 s in a log file."""

from __future__ import annotations

import io
import sys

from onnx_qubo.core import progress
from onnx_qubo.core.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_layers(bars: Progress, clock: Clock, layers: int = 60, rows: int = 8) -> None:
    """A run as quantize does one: a stage, then a bar per layer, each row a second."""
    with bars.bar(4, "calibrating") as bar:
        bar.update(4)
    for _ in range(layers):
        with bars.bar(rows, "fast") as bar:
            for _ in range(rows):
                clock.now += 1.0
                bar.update(1)


def test_stderr_not_a_terminal_gets_at_most_a_line_every_30_seconds(monkeypatch):
    clock, log = Clock(), io.StringIO()
    monkeypatch.setattr(progress, "_clock", clock, raising=False)
    monkeypatch.setattr(sys, "stderr", log)
    run_layers(Progress(enabled=True), clock)  # 60 layers, 480 s
    lines = log.getvalue().splitlines()
    assert 480 // 30 - 1 <= len(lines) <= 480 // 30, lines
    assert all(line.startswith("onnx-qubo: fast ") and line.endswith(" s)") for line in lines)
    assert lines[0] == "onnx-qubo: fast 6/8 (30 s)" and "\r" not in log.getvalue()


def test_a_terminal_gets_bars_redrawn_in_place():
    clock, screen = Clock(), Terminal()
    run_layers(Progress(enabled=True, stream=screen), clock, layers=2)
    shown = screen.getvalue()
    assert "calibrating" in shown and "fast" in shown and "8/8" in shown and "\r" in shown


def test_disabled_progress_writes_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    run_layers(Progress(), Clock(), layers=3)
    assert log.getvalue() == ""
