"""A dependency-free progress bar for ``calibrate``: phase, item i/N, elapsed time and an ETA.

On a terminal it is one line rewritten in place (``\\r`` and clear-to-end); on anything else (a
log file, a pipe, a notebook's captured stderr) it writes plain lines, at most one per
``interval`` seconds plus each phase's last item, so logs stay short. The ETA of a phase is its
elapsed time per unit of work done times the work left, with work counted in weights, so a big
matrix moves the bar further than a small one.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}" if seconds >= 60 else f"{seconds:.1f}s"


class Progress:
    """``enabled``: False writes nothing; True writes to stderr; a stream writes to it."""

    def __init__(self, enabled: bool | TextIO, interval: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 width: int = 30) -> None:
        self.stream: TextIO | None = None if enabled is False else sys.stderr if enabled is True else enabled
        self.tty = bool(self.stream is not None and getattr(self.stream, "isatty", lambda: False)())
        self.interval, self.clock, self.width = interval, clock, width
        self.start = clock()
        self._last_plain = -float("inf")

    def note(self, text: str) -> None:
        """A one-off line (a phase with no items)."""
        if self.stream is not None:
            self._write(f"calibrate: {text} (elapsed {_clock(self.clock() - self.start)})", final=True)

    def phase(self, name: str, items: Iterable[Any], size: Callable[[Any], float] = lambda _: 1.0,
              label: Callable[[Any], str] = str) -> Iterator[Any]:
        """Yields ``items``, showing before each the phase, its index, ``label(item)``, elapsed
        time and the ETA from the ``size`` of the items done so far."""
        items = list(items)
        total = float(sum(size(i) for i in items)) or 1.0
        began, done = self.clock(), 0.0
        for index, item in enumerate(items):
            if self.stream is not None:
                now = self.clock()
                eta = (now - began) / done * (total - done) if done else None
                self._show(name, index, len(items), done / total, label(item), now, eta, final=False)
            yield item
            done += size(item)
        if self.stream is not None and items:
            self._show(name, len(items), len(items), 1.0, "done", self.clock(), 0.0, final=True)

    def _show(self, name: str, index: int, count: int, fraction: float, label: str, now: float,
              eta: float | None, final: bool) -> None:
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        head = (f"calibrate: {name} [{bar}] {index}/{count} elapsed {_clock(now - self.start)} "
                f"ETA {'?' if eta is None else _clock(eta)}")
        line = f"{head} {label}"
        if self.tty:  # never wrap: a wrapped line cannot be rewritten in place
            line = line[:max(len(head), shutil.get_terminal_size((100, 20)).columns - 1)]
        elif not final and now - self._last_plain < self.interval:
            return
        self._last_plain = now
        self._write(line, final)

    def _write(self, line: str, final: bool) -> None:
        assert self.stream is not None
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
