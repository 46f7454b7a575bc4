"""Progress displays for fetches: a live bar on a terminal, log lines elsewhere.

On a terminal (``stderr.isatty()``) a rich progress bar shows bytes, rate and
ETA. Otherwise (HTCondor job logs, CI) a plain line is written every
``interval`` seconds and when the fetch ends, so a log shows progress without
control characters.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from pixicache.fetch.results import FetchReport, FetchResult, ProgressSink


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``.

    >>> human_bytes(3705969704)
    '3.45 GiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def human_rate(nbytes: float, seconds: float) -> str:
    return human_bytes(nbytes / seconds) + "/s" if seconds > 0 else "-"


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total_bytes = 0
        self.total_artifacts = 0
        self.done_bytes = 0
        self.done_artifacts = 0
        self.failed = 0
        self.start = time.monotonic()

    def begin(self, total_artifacts: int, total_bytes: int) -> None:
        with self.lock:
            self.total_artifacts += total_artifacts
            self.total_bytes += total_bytes

    def advance(self, nbytes: int) -> None:
        with self.lock:
            self.done_bytes += nbytes

    def artifact_done(self, result: FetchResult) -> None:
        with self.lock:
            self.done_artifacts += 1
            if not result.ok:
                self.failed += 1


class LogProgress(_Counter):
    """A plain line every ``interval`` seconds (for logs that are not terminals)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 10.0, label: str = "fetch") -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.interval = interval
        self.label = label
        self._last = time.monotonic()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
        eta = (self.total_bytes - self.done_bytes) / rate if rate > 0 else float("nan")
        eta_s = f"{eta:.0f}s" if eta == eta else "?"
        return (
            f"[pixicache] {self.label}: {self.done_artifacts}/{self.total_artifacts} artifacts, "
            f"{human_bytes(self.done_bytes)}/{human_bytes(self.total_bytes)} ({pct:.0f}%), "
            f"{human_rate(self.done_bytes, elapsed)}, ETA {eta_s}"
        )

    def _maybe_print(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(self._line(), file=self.stream, flush=True)

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        self._maybe_print()

    def artifact_done(self, result: FetchResult) -> None:
        super().artifact_done(result)
        self._maybe_print()

    def end(self, report: FetchReport) -> None:
        print(self._line(), file=self.stream, flush=True)


class RichProgress(_Counter):
    """A live bar on a terminal: bytes, rate, ETA, artifacts done."""

    def __init__(self, stream: TextIO | None = None, label: str = "fetch") -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[artifacts]}"),
            console=Console(file=stream or sys.stderr),
            transient=False,
        )
        self._task = self._progress.add_task(label, total=None, artifacts="")
        self._progress.start()

    def begin(self, total_artifacts: int, total_bytes: int) -> None:
        super().begin(total_artifacts, total_bytes)
        self._progress.update(self._task, total=self.total_bytes, artifacts=self._count())

    def _count(self) -> str:
        return f"{self.done_artifacts}/{self.total_artifacts}"

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        self._progress.update(self._task, completed=self.done_bytes)

    def artifact_done(self, result: FetchResult) -> None:
        super().artifact_done(result)
        self._progress.update(self._task, artifacts=self._count())

    def end(self, report: FetchReport) -> None:
        self._progress.update(self._task, completed=self.done_bytes, artifacts=self._count())
        self._progress.stop()


def make_progress(mode: str = "auto", stream: TextIO | None = None, label: str = "fetch") -> ProgressSink | None:
    """``mode``: ``auto`` (bar on a terminal, else log lines), ``bar``, ``log``, ``none``."""
    stream = stream or sys.stderr
    if mode == "none":
        return None
    if mode == "bar" or (mode == "auto" and stream.isatty()):
        return RichProgress(stream, label=label)
    return LogProgress(stream, label=label)
