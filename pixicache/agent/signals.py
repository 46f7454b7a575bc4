"""Signals before the task starts: SIGTERM / SIGINT / SIGHUP stop the agent cleanly.

HTCondor sends SIGTERM on eviction. While the agent plans, fetches and
installs, :func:`interruptible` turns those signals into
:class:`AgentInterrupted` (exit ``128 + N``), so the report is still written
and every lock is released. Once the task runs, the runner forwards them to the
task instead (:mod:`pixicache.agent.runner`).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

from pixicache.errors import Interrupted

__all__ = ["STOP_SIGNALS", "AgentInterrupted", "interruptible"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class AgentInterrupted(Interrupted):
    """A signal stopped the agent before the task started (exit code ``128 + N``)."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} before the task started")
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn :data:`STOP_SIGNALS` into :class:`AgentInterrupted` (main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise AgentInterrupted(signum)

    old: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for signum, prev in old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, prev)
