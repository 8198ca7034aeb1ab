"""Progress on stderr for long work, or nothing at all (library use, tests).

On a terminal: a bar per stage, redrawn in place. Elsewhere (a log file, a pipe, CI), where a
redrawn bar would become one line per stage and layer: at most one line every LOG_INTERVAL
seconds, ``onnx-qubo: <stage> <done>/<total> (<seconds since the first stage began> s)``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, Protocol, TextIO

import click

LOG_INTERVAL = 30.0  # seconds between two progress lines when stderr is not a terminal
_clock = time.monotonic  # tests replace it


class Bar(Protocol):
    def update(self, steps: int) -> None: ...


class _Silent:
    def update(self, steps: int) -> None:
        pass


class _Logged:
    """A stage's progress as log lines, written through its ``Progress`` at most every LOG_INTERVAL."""

    def __init__(self, owner: Progress, total: int, label: str):
        self.owner, self.total, self.label, self.done = owner, total, label, 0

    def update(self, steps: int) -> None:
        self.done += steps
        self.owner.log(self)


class Progress:
    """Hands out progress bars; ``Progress(enabled=False)`` hands out silent ones. ``stream``:
    where they go (default: stderr at the time of the bar)."""

    def __init__(self, enabled: bool = False, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream
        self.started: float | None = None  # when the first logged stage began
        self.last_line: float | None = None  # when the last log line was written

    @contextlib.contextmanager
    def bar(self, total: int, label: str) -> Iterator[Bar]:
        if not self.enabled:
            yield _Silent()
            return
        stream = self.stream or sys.stderr
        if stream.isatty():
            with click.progressbar(length=total, label=label, file=stream, show_pos=True, show_eta=True) as bar:
                yield bar
            return
        now = _clock()
        if self.started is None:
            self.started = self.last_line = now
        logged = _Logged(self, total, label)
        yield logged
        self.log(logged)  # the stage's end, when a line is due

    def log(self, bar: _Logged) -> None:
        """Write ``bar``'s state when LOG_INTERVAL has passed since the last line."""
        now = _clock()
        if self.started is None or self.last_line is None or now - self.last_line < LOG_INTERVAL:
            return
        self.last_line = now
        stream = self.stream or sys.stderr
        stream.write(f"onnx-qubo: {bar.label} {bar.done}/{bar.total} ({now - self.started:.0f} s)\n")
        stream.flush()
