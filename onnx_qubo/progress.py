"""Progress bars on stderr for long work, or nothing at all (library use, tests)."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Protocol

import click


class Bar(Protocol):
    def update(self, steps: int) -> None: ...


class _Silent:
    def update(self, steps: int) -> None:
        pass


class Progress:
    """Hands out progress bars; ``Progress(enabled=False)`` hands out silent ones."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    @contextlib.contextmanager
    def bar(self, total: int, label: str) -> Iterator[Bar]:
        if not self.enabled:
            yield _Silent()
            return
        with click.progressbar(length=total, label=label, file=sys.stderr,
                               show_pos=True, show_eta=True) as bar:
            yield bar
