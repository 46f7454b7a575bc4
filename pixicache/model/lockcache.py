"""The cache of parsed locks behind :meth:`pixicache.model.lockfile.Lock.load_cached`.

An entry is one pickled :class:`~pixicache.model.lockfile.Lock` in a directory of
this user's alone (the store's user area, ``<store>/user.<uid>/parsed-locks``). A pickle
runs code when it is loaded, so an entry is read only when it is a regular file
(opened without following links) owned by this user and writable by nobody else;
anything else, or an entry that does not load into a ``Lock``, is a miss. Entries
are written through a private temporary file and a rename, and at most
:data:`KEEP` are kept (the oldest go when a new one is written). Every failure
here is a miss: the lock is then parsed, as without a cache.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import stat
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["KEEP", "read", "write"]

KEEP = 32
"""Entries kept per directory (one per lock a user's jobs ran; ~100 KB each)."""

_T = TypeVar("_T")


def read(entry: Path, cls: type[_T]) -> _T | None:
    """The ``cls`` instance pickled at ``entry``, or ``None`` (a miss, or an entry
    that is not this user's alone)."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.getuid()
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            return None
        try:
            value: Any = pickle.load(fh)
        except Exception:  # a truncated or stale entry: parse again, and replace it
            return None
    return value if isinstance(value, cls) else None


def write(entry: Path, value: object) -> None:
    """Store ``value`` at ``entry`` (mode 0600); failures are ignored (no cache)."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, entry)
    except Exception:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return
    _prune(entry.parent)


def _prune(directory: Path) -> None:
    """Keep the :data:`KEEP` newest entries of ``directory``."""
    try:
        entries = [e for e in os.scandir(directory) if e.name.endswith(".pickle") and e.is_file(follow_symlinks=False)]
        if len(entries) <= KEEP:
            return
        entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns)
    except OSError:
        return
    for old in entries[: len(entries) - KEEP]:
        with contextlib.suppress(OSError):
            os.unlink(old.path)
