"""What the long-running commands share: a progress line, a gentle Ctrl-C and the plotting module."""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Optional


class Progress:
    """A one-line progress bar with an ETA on stderr (a plain line per 10% when stderr is not a terminal)."""

    def __init__(self, command: str, unit: str, total: int) -> None:
        self.command = command
        self.unit = unit
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_tenth = -1

    def advance(self, label: str, steps: int = 1) -> None:
        self.done += steps
        share = self.done / self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / share - elapsed
        if self.tty:
            bar = "#" * int(30 * share)
            sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} eta {eta:4.0f} s  {label[:40]:<40}")
            if self.done >= self.total:
                sys.stderr.write("\r" + " " * 100 + "\r")
        elif int(share * 10) != self.last_tenth:
            self.last_tenth = int(share * 10)
            sys.stderr.write(f"{self.command}: {self.done}/{self.total} {self.unit}, eta {eta:.0f} s\n")
        sys.stderr.flush()

    def clear(self) -> None:
        """Removes an unfinished bar (after Ctrl-C)."""
        if self.tty and self.done < self.total:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


class StopOnInterrupt:
    """While active, the first Ctrl-C sets `event` (work stops at its next check); a second one interrupts at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.previous: Any = None

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def __enter__(self) -> "StopOnInterrupt":
        self.event.clear()
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; RuntimeError with the install command without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .console import install_hint

        raise RuntimeError(f"--plot needs matplotlib: {install_hint('bench')}") from None
    return plt
