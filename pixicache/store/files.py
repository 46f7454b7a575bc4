"""How the store touches the file system: modes for several users, and never through a link.

A node store is often shared by the jobs of several Unix users (a group-owned
directory). Two rules hold for every file and directory the store creates or
opens:

* **Modes do not depend on the creating process's umask.** In a shared store,
  the top directories (``sha256/``, ``locks/``, ``quarantine/``) are ``3775``
  (``rwxrwsr-t``: the group is inherited through setgid, and the sticky bit lets
  only a directory's owner rename or remove it, so no member can swap
  ``sha256/ab`` for a link to somewhere else); the fan-out directories below
  them (``sha256/ab/``) are ``2775``, not sticky on purpose: any member can move
  a corrupt blob to ``quarantine/`` (every consumer verifies what it uses, so a
  member can disturb, never poison). Shared files are ``0664``, blobs ``0444``.
  The modes are set with ``chmod``/``fchmod`` after creation, so a root shell with
  ``umask 022`` warming a node leaves a store every member of the group can use.
* **Nothing is opened through a symbolic link or as a non-regular file.**
  Every open uses ``O_NOFOLLOW`` and checks ``fstat`` for a regular file; a
  planted link or device is :class:`NotRegular`, which the store treats as a
  corrupt entry (never as data).

A store is *shared* when its root has the setgid or sticky bit, or is writable
by others (the set-ups the README documents). Then each user also gets a private
area (:mod:`pixicache.userarea`: partial downloads, the extracted package cache,
the unpacked bundle, Pixi): what one user extracted or unpacked is never code or
data another user's job runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from pixicache.userarea import is_shared_mode, not_private

__all__ = [
    "BLOB_MODE",
    "SHARED_DIR_MODE",
    "SHARED_FILE_MODE",
    "SHARED_TOP_DIR_MODE",
    "NotRegular",
    "check_private",
    "create_exclusive",
    "is_shared_dir",
    "make_dir",
    "open_regular",
    "publish_new",
    "sticky_if_mine",
]

SHARED_DIR_MODE = 0o2775
SHARED_TOP_DIR_MODE = 0o3775
SHARED_FILE_MODE = 0o664
PRIVATE_DIR_MODE = 0o700
BLOB_MODE = 0o444

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class NotRegular(OSError):
    """A store path is a symbolic link, a directory or a special file, not a regular file."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        super().__init__(errno.ELOOP, f"{os.fspath(path)} is {what}, not a regular file")
        self.path = Path(path)
        self.what = what


def is_shared_dir(st: os.stat_result) -> bool:
    """Whether a store root with this ``stat`` is shared by several users (see the module doc)."""
    return is_shared_mode(st.st_mode)


def check_private(path: Path) -> None:
    """Raise :class:`NotRegular` unless ``path`` is a real directory of this user's that
    nobody else may write to (a user's own area, where code it runs is unpacked)."""
    why = not_private(path)
    if why is not None:
        raise NotRegular(path, why)


def describe(st: os.stat_result) -> str:
    """What kind of file ``st`` is, in words."""
    mode = st.st_mode
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a regular file"


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``os.open`` that refuses links and anything but a regular file.

    Raises:
        NotRegular: ``path`` is a symbolic link (``ELOOP``) or not a regular file.
        OSError: as ``os.open`` (``FileNotFoundError``, ``PermissionError``...).
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular(path, "a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(path, describe(st))
    return fd


def file_identity(st: os.stat_result) -> str:
    """What changes when a file's bytes could have: device, inode, size, mtime, ctime
    (a rewrite, a replacement, a ``touch`` or ``chmod`` all show)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def open_leaf(path: str | os.PathLike[str]) -> int:
    """:func:`open_regular` for reading, with the parent directory opened without
    following a link too (``<store>/sha256/ab/<digest>``: a member of a shared store's
    group may replace ``ab`` by a link to a directory it cannot read itself).

    Raises:
        NotRegular: the file or its directory is a link, or the file is not regular.
        OSError: as ``os.open``.
    """
    path = os.fspath(path)
    parent, name = os.path.split(path)
    try:
        dfd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotRegular(parent, "a symbolic link (or not a directory)") from None
        raise
    try:
        try:
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotRegular(path, "a symbolic link") from None
            raise
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(path, describe(st))
    return fd


def create_exclusive(path: str | os.PathLike[str], mode: int, flags: int = os.O_RDWR) -> int:
    """Create ``path`` (it must not exist: ``O_EXCL``, no link followed) with exactly ``mode``."""
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd


def sticky_if_mine(path: Path) -> None:
    """Add the sticky bit to a directory this user (or root) owns and that lacks it (a
    store made before the top directories were sticky); others' are left as they are."""
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_ISVTX and os.geteuid() in (st.st_uid, 0):
            os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_ISVTX)
    except OSError:
        pass


def publish_new(path: Path, mode: int) -> None:
    """Create the empty file ``path`` so that it is never visible with another mode.

    :func:`create_exclusive` sets the mode right after creating the file; a second
    process opening it in between would see the umask's mode (SQLite then silently
    opens a database read-only for good). Here the file is made, with its mode, under
    a temporary name and linked into place, so whoever opens ``path`` sees ``mode``.

    Raises:
        FileExistsError: ``path`` exists already.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.close(create_exclusive(tmp, mode))
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def make_dir(path: Path, mode: int, *, stop: Path | None = None) -> None:
    """Create ``path`` and missing parents (up to ``stop``), each with exactly ``mode``.

    A directory that exists is left as it is (another user may own it); one that
    exists as anything but a directory (a planted link) raises :class:`NotRegular`.
    """
    missing: list[Path] = []
    p = path
    while True:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            missing.append(p)
            if p.parent == p or (stop is not None and p == stop):
                break
            p = p.parent
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotRegular(p, describe(st) + " where a directory belongs")
        break
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode):
                raise NotRegular(d, describe(st) + " where a directory belongs") from None
            continue
        with contextlib.suppress(OSError):
            os.chmod(d, mode)  # umask-proof
