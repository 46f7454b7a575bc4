"""Advisory file locks that work across processes (and threads) on one node.

The store takes an exclusive lock on ``locks/<sha256>.lock`` while it fills a
blob, and a shared lock while a blob is in use (an install reading it, a server
streaming it). ``gc`` only removes a blob whose exclusive lock it can take
without waiting. Locks are ``flock(2)`` locks: the kernel drops them when the
holder dies, even by ``kill -9``, so a crashed job never wedges its node.

Each :class:`FileLock` opens its own file description, so two threads of one
process exclude each other just as two processes do.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType


class LockTimeout(TimeoutError):
    """The lock could not be taken within the time allowed."""


class FileLock:
    """An ``flock`` on one file; a context manager.

    Args:
        path: the lock file (created if missing, never deleted).
        shared: take a shared (read) lock instead of an exclusive one.
        timeout: seconds to wait; ``None`` waits forever, ``0`` does not wait.
        mode: permission bits for a newly created lock file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shared: bool = False,
        timeout: float | None = None,
        mode: int = 0o666,
    ) -> None:
        self.path = Path(path)
        self.shared = shared
        self.timeout = timeout
        self.mode = mode
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FileLock:
        """Take the lock, waiting up to ``timeout``; raise :class:`LockTimeout`."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.mode)
        op = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            if self.timeout is None:
                fcntl.flock(fd, op)
            else:
                deadline = time.monotonic() + self.timeout
                delay = 0.005
                while True:
                    try:
                        fcntl.flock(fd, op | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise LockTimeout(
                                f"could not lock {self.path} within {self.timeout:g} s"
                            ) from None
                        time.sleep(delay)
                        delay = min(delay * 2, 0.1)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (a no-op if not held)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the description drops the flock

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - safety net
        self.release()
