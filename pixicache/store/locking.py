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

from pixicache.errors import StoreError
from pixicache.store.files import NotRegular, create_exclusive, open_regular


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

    def _open(self) -> int:
        return open_lock_file(self.path, self.mode)

    def acquire(self) -> FileLock:
        """Take the lock, waiting up to ``timeout``; raise :class:`LockTimeout`.

        Raises:
            StoreError: the lock file cannot be opened (no permission, or it is
                a planted link or special file): the message names it.
        """
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        fd = self._open()
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


def open_lock_file(path: Path, mode: int) -> int:
    """Open (or create, with exactly ``mode``) the lock file ``path``, never through a
    link; the fd a :class:`FileLock` (or a caller keeping it open) locks.

    A lock file another user created may be read-only to us: ``flock`` works
    on a read-only descriptor too.

    Raises:
        StoreError: it cannot be opened (no permission, or it is a planted link or
            special file): the message names it and says what to do.
    """
    try:
        try:
            return create_exclusive(path, mode)
        except FileExistsError:
            pass
        try:
            return open_regular(path, os.O_RDWR)
        except PermissionError:
            return open_regular(path, os.O_RDONLY)
    except NotRegular as exc:
        raise StoreError(
            f"the lock file {exc.path} is {exc.what}, not a regular file: pixicache never "
            "opens a store file through a link. Remove it (as its owner or root) and "
            "check who can write to the store"
        ) from None
    except PermissionError as exc:
        raise StoreError(
            f"cannot open the lock file {path}: {exc.strerror}. This user (uid "
            f"{os.getuid()}) cannot write to the store there; make the store usable by "
            "the group of its users (see 'A store shared by several users' in the "
            "README: chgrp -R GROUP STORE; chmod -R g+rwX STORE; find STORE -type d "
            "-exec chmod g+s,+t {} +) or point PIXICACHE_CACHE_DIR at a store of your own"
        ) from None
