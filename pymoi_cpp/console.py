"""Terminal helpers shared by the `pymoi` commands: exit codes, --beta values, the status line and reply timing."""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import threading
import time
from typing import Any, Callable, Iterator, Optional, TextIO

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

PACKAGE = "pymoi-cpp"


def extra_requirements(extra: str) -> list[str]:
    """The requirements of one of this package's extras on this platform, from its installed metadata
    (empty when the metadata cannot be read)."""
    from importlib import metadata

    try:
        requirements = metadata.requires(PACKAGE) or []
    except metadata.PackageNotFoundError:
        return []
    names_extra = re.compile(r"""extra\s*==\s*["']""" + re.escape(extra) + r"""["']""")
    chosen = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if not names_extra.search(marker):
            continue
        try:
            from packaging.markers import Marker
        except ImportError:  # keep only what holds everywhere
            if names_extra.sub("", marker).strip():
                continue
        else:
            if not Marker(marker).evaluate({"extra": extra}):
                continue
        chosen.append(spec.replace(" ", ""))
    return chosen


def install_hint(extra: str) -> str:
    """How to install one of this package's extras: its requirements by name (pymoi-cpp itself is on no
    package index), or the extra from a checkout of the source."""
    from_checkout = f"pip install --no-build-isolation '.[{extra}]' in a pymoi-cpp checkout"
    requirements = extra_requirements(extra)
    if not requirements:
        return from_checkout
    return f"pip install {' '.join(shlex.quote(requirement) for requirement in requirements)} (or {from_checkout})"


def parse_beta(text: str) -> Optional[float]:
    """--beta value: a number >= 0, 'direct' (-100) or 'none'/'off' (ordinary decoding)."""
    from .mixing import validate_beta

    word = text.strip().lower()
    if word in ("none", "off"):
        return None
    if word == "direct":
        return -100.0
    try:
        return validate_beta(float(word))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a beta: use a number >= 0, 'direct' (or <= -99) for the direct mixture, or 'off'"
        ) from error


def describe_rate(tokens: int, rate: float, beta: Optional[float], thinking: Any = None) -> str:
    """The statistics line after a reply: tokens, tokens/s and beta, and with Soft Thinking (`thinking`, a
    soft_thinking.ThinkingReport) the concept tokens and what ended the span."""
    speed = "" if math.isnan(rate) else f", {rate:.1f} tok/s"
    line = f"{tokens} token{'' if tokens == 1 else 's'}{speed}, beta {describe_beta(beta)}"
    if thinking is not None:
        ended = {"close_tag": "closed by the model", "cold_stop": "Cold Stop", "budget": "budget spent"}.get(thinking.ended_by, "open")
        line += f", thought {thinking.steps} concept token{'' if thinking.steps == 1 else 's'} ({ended})"
    return line


def describe_beta(beta: Optional[float]) -> str:
    if beta is None:
        return "off"
    return "direct" if beta <= -99 else f"{beta:g}"


class Status:
    """One-line status messages on a stream: dim on a terminal, silent when quiet."""

    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet
        self.styled = stream.isatty() and "NO_COLOR" not in os.environ

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.styled else text

    def line(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(self.dim(text) + "\n")
            self.stream.flush()

    def while_running(self, label: str, work: Callable[[], Any]) -> Any:
        """Runs work(), showing label and the seconds elapsed (live on a terminal)."""
        if self.quiet or not self.styled:
            return work()
        done = threading.Event()
        start = time.perf_counter()

        def tick() -> None:
            while not done.wait(0.1):
                self.stream.write(f"\r{self.dim(f'{label} {time.perf_counter() - start:.1f} s')}")
                self.stream.flush()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            return work()
        finally:
            done.set()
            ticker.join()
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


class Timer:
    """Time to the first piece of text and generation rate of one streamed reply."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: Optional[float] = None
        self.end: Optional[float] = None

    def stream(self, pieces: Iterator[str]) -> Iterator[str]:
        for piece in pieces:
            if self.first is None:
                self.first = time.perf_counter()
            yield piece
        self.end = time.perf_counter()

    def tokens_per_second(self, tokens: int) -> float:
        """Tokens after the first one over the time after the first one."""
        end = self.end or time.perf_counter()
        if self.first is None or tokens < 2 or end <= self.first:
            return math.nan
        return (tokens - 1) / (end - self.first)
