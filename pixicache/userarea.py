"""Where one Unix user's own files go in a node store that several users share.

A shared node store (see :mod:`pixicache.store.files`) holds, besides the blobs
every user may read, things that must belong to one user alone: partial
downloads, the extracted package cache that user's prefixes hard-link to, the
unpacked single-file agent (code that user's jobs run) and verified Pixi
binaries. They live in ``<store>/user.<uid>/``, a directory of that user's,
mode 0700, directly under the store root.

That is safe only when nobody else can rename or replace it: the store root
must have the sticky bit (``install -d -m 3775 -g GROUP STORE``: then only an
entry's owner may rename it), or be writable by its owner alone. When it is not
(a ``2775`` root, as older instructions said), the user's own files go to
``$TMPDIR/pixicache-<uid>`` instead (private, checked) and the store is used
for blobs only. Stdlib only: the bundle's launcher uses it before anything else
is importable.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["SHARED_BITS", "is_shared_mode", "not_private", "root_is_safe", "user_area"]

SHARED_BITS = stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH
"""A store root with any of these is shared by several users (setgid, sticky, world-writable)."""


def is_shared_mode(mode: int) -> bool:
    return bool(mode & SHARED_BITS)


def root_is_safe(mode: int) -> bool:
    """Whether entries of a directory with ``mode`` can be renamed only by their owners."""
    return bool(mode & stat.S_ISVTX) or not mode & (stat.S_IWGRP | stat.S_IWOTH)


def user_area(root: str | os.PathLike[str], shared: bool | None = None) -> Path:
    """This user's own area of the store at ``root`` (``root`` itself when not shared)."""
    root = Path(root)
    try:
        mode = os.stat(root).st_mode
    except OSError:
        return root
    if not (is_shared_mode(mode) if shared is None else shared):
        return root
    uid = os.getuid()
    if root_is_safe(mode):
        return root / f"user.{uid}"
    import tempfile

    return Path(tempfile.gettempdir()) / f"pixicache-{uid}"


def not_private(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a directory of this user's alone (a link, someone else's, writable
    by others), or ``None`` when it is."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return "not a directory (a link or a file stands there)"
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"a directory of uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o} (it must be "
            f"uid {os.getuid()}'s own, writable by nobody else)"
        )
    return None
