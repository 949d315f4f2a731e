"""Pieces both commands share (``autoregister`` and ``autoregister tables``): the one-line-error argument
parser and the progress bar. They live here, not in cli.py, so tables.py does not import cli.py, which
imports tables.py."""

from __future__ import annotations

import argparse
import sys
import threading
import time

from .events import ExitCode, RunningSet


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2."""

    def error(self, message):
        """Print one line and exit 2."""
        self.exit(ExitCode.USAGE, f"autoregister: error: {message}\n")


class ProgressBar:
    """A one-line progress bar on stderr, redrawn as events arrive."""

    def __init__(self, stream=None, width: int = 30):
        """Draw onto `stream` (stderr by default)."""
        self.stream, self.width = stream or sys.stderr, width
        self.running = RunningSet()
        self.start = time.perf_counter()
        self.lock = threading.Lock()

    @property
    def fraction(self) -> float:
        """How far the run is, 0 to 1."""
        return self.running.fraction

    def __call__(self, event: dict) -> None:
        """Take one progress event."""
        with self.lock:
            self.running.update(event)
            self.draw()

    def draw(self) -> None:
        """Redraw the bar."""
        filled = int(self.width * self.fraction)
        names = ", ".join(self.running.names)[:50]
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {100 * self.fraction:3.0f}% "
                          f"{time.perf_counter() - self.start:5.0f}s {names:<50}")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        self.stream.write("\n")
        self.stream.flush()
