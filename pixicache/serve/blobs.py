"""Committed blobs as the server sends them, and the requests known to be plain hits.

* :class:`BlobFiles` opens a blob for sending, never through a link (relative to its
  fan-out directory, itself opened without following one), and pins a blob against
  eviction while a long body is sent (a shared ``flock`` on its lock file, which
  ``gc`` must take exclusively; one per blob and process, counted; the lock files of
  the blobs sent last kept open, so a pin costs two ``flock`` calls, not five calls).
* :class:`KnownHits` remembers which request targets this process answered as hits,
  and with which blob, so that the front path (:mod:`pixicache.serve.front`) can
  answer them again without aiohttp. It only remembers: whether a target is still a
  hit is checked at every request (:meth:`pixicache.serve.app.ServeApp.ready_hit`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from typing import NamedTuple

from pixicache.errors import StoreError
from pixicache.serve.writer import lock_mode
from pixicache.store import Store
from pixicache.store.files import NotRegular
from pixicache.store.locking import open_lock_file

__all__ = ["LOCK_FILES", "BlobFiles", "KnownHit", "KnownHits"]

LOCK_FILES = 256
"""Lock files a server process keeps open for pins when no pin holds them (those of the
blobs pinned last; a pinned blob's stays open while it is pinned, whatever the count)."""


class BlobFiles:
    """Opens and pins the blobs of ``store`` (one per server process)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._dirfds: dict[str, int] = {}  # fan-out directory -> an fd (see open)
        self._pins: dict[str, tuple[bool, int]] = {}  # sha -> (locked, pins)
        self._lock_fds: dict[str, int] = {}  # sha -> its lock file, the last used last

    def open(self, sha: str) -> tuple[int, os.stat_result]:
        """Open a blob for reading, never through a link: relative to its fan-out
        directory, opened (once per process, without following a link) and kept; a
        stale one (the directory was replaced) is opened afresh once. Returns the fd
        and its ``fstat``.

        Raises:
            FileNotFoundError, NotADirectoryError: no such blob (evicted, never there).
            NotRegular: a link or special file stands at the blob's or directory's path.
            OSError: anything else the open or ``fstat`` met.
        """
        sub = self.store.fanout(sha)  # a digest, so a safe name relative to it
        for attempt in (0, 1):
            dfd = self._dirfds.get(sub)
            if dfd is None:
                try:
                    dfd = os.open(
                        self.store.blob_dir / sub,
                        os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    )
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise NotRegular(self.store.blob_dir / sub, "a link, not a directory") from None
                    raise
                self._dirfds[sub] = dfd
            try:
                fd = os.open(sha, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                break
            except FileNotFoundError:
                if attempt:
                    raise
                os.close(self._dirfds.pop(sub))
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise NotRegular(self.store.path_for(sha), "a symbolic link") from None
                raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotRegular(self.store.path_for(sha), "not a regular file")
        return fd, st

    def pin(self, sha: str) -> None:
        """Keep ``gc`` from evicting ``sha`` until as many :meth:`unpin` calls: a shared
        lock on its lock file, taken without waiting. If it cannot be taken (``gc``
        holds it right now, or the lock file cannot be opened) the blob is not pinned,
        and an open fd still reads the bytes of a removed file.

        The lock file stays open after the last :meth:`unpin` (the :data:`LOCK_FILES`
        used last), so pinning a blob sent again is two ``flock`` calls. If someone
        replaces a lock file meanwhile, pins of that blob lock the old one until its
        fd is dropped from the cache: ``gc`` may then evict the blob while it is being
        sent, which the open fd survives, as above."""
        held = self._pins.get(sha)
        if held is not None:
            self._pins[sha] = (held[0], held[1] + 1)
            return
        fd = self._lock_file(sha)
        locked = False
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                locked = True
            except OSError:  # gc holds it (EWOULDBLOCK), or the fd cannot be locked
                pass
        self._pins[sha] = (locked, 1)

    def _lock_file(self, sha: str) -> int | None:
        """The open lock file of ``sha`` (``None``: it cannot be opened), made the last
        used; the oldest unpinned ones beyond :data:`LOCK_FILES` are closed."""
        fd = self._lock_fds.pop(sha, None)
        if fd is None:
            try:
                fd = open_lock_file(self.store.lock_dir / f"{sha}.lock", lock_mode(self.store))
            except (StoreError, OSError):
                return None
            if len(self._lock_fds) >= LOCK_FILES:
                for old in list(self._lock_fds):
                    if old not in self._pins:
                        os.close(self._lock_fds.pop(old))
                        if len(self._lock_fds) < LOCK_FILES:
                            break
        self._lock_fds[sha] = fd
        return fd

    def pins(self, sha: str) -> int:
        """How many :meth:`pin` calls of ``sha`` are not undone yet."""
        held = self._pins.get(sha)
        return held[1] if held is not None else 0

    def unpin(self, sha: str) -> None:
        """Undo one :meth:`pin` of ``sha``."""
        held = self._pins.get(sha)
        if held is None:
            return
        if held[1] > 1:
            self._pins[sha] = (held[0], held[1] - 1)
            return
        del self._pins[sha]
        fd = self._lock_fds.get(sha)
        if held[0] and fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the directories and lock files kept open (pins held are dropped)."""
        self._pins.clear()
        for fds in (self._dirfds, self._lock_fds):
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            fds.clear()


class KnownHit(NamedTuple):
    """A request target answered as a hit: its route (for the metrics), the blob, and
    for a channel path the upstream URL whose index entry must still name the blob."""

    route: str
    sha256: str
    url: str | None


class KnownHits:
    """Request targets (path and query, as sent) answered as hits: at most ``limit``
    (then forgotten all at once and learned again), none longer than ``longest``
    characters (a client choosing queries must not make the table large: at most
    ~``limit * longest`` bytes)."""

    def __init__(self, limit: int = 20_000, longest: int = 512) -> None:
        self._targets: dict[str, KnownHit] = {}
        self._limit = limit
        self._longest = longest

    def learn(self, target: str, route: str, sha: str, url: str | None) -> None:
        if len(target) > self._longest:
            return
        if target not in self._targets and len(self._targets) >= self._limit:
            self._targets.clear()
        self._targets[target] = KnownHit(route, sha, url)

    def get(self, target: str) -> KnownHit | None:
        return self._targets.get(target)

    def clear(self) -> None:
        self._targets.clear()

    def __len__(self) -> int:
        return len(self._targets)
