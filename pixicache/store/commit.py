"""The one way bytes become a blob: verify → fsync → read-only → rename → fsync the directory.

Every writer of the store (the agent's :class:`~pixicache.store.writer.BlobWriter`,
the mirror's :class:`~pixicache.serve.writer.FillWriter`) streams into a partial
file and hands it to :func:`commit_partial`, so the rule is written once:

1. the digest (and size, when known) of what was written must be the one expected,
   else :class:`~pixicache.errors.IntegrityError` and nothing is renamed;
2. the bytes reach the disk (``fdatasync`` when the store is durable) and the file
   is made read-only;
3. it is renamed to ``sha256/<ab>/<digest>`` — atomically, so a reader sees either
   no blob or the whole verified one — and the directory entry is synced;
4. the index records the blob (and the URL it came from).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pixicache.errors import IntegrityError
from pixicache.store.files import file_identity
from pixicache.store.locking import LockTimeout

if TYPE_CHECKING:
    from pixicache.store.cas import Store


def fsync_dir(path: Path) -> None:
    """``fsync`` a directory, so a rename in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_digest(
    name: str,
    *,
    expected: str,
    actual: str,
    size: int,
    expected_size: int | None,
    kind: str = "SHA-256",
) -> None:
    """Raise :class:`IntegrityError` unless ``actual``/``size`` are what was expected."""
    wrong_size = expected_size is not None and size != expected_size
    if actual == expected and not wrong_size:
        return
    size_note = f" (got {size} bytes, expected {expected_size})" if wrong_size else ""
    raise IntegrityError(
        f"{name}: {kind} mismatch: expected {expected}, got {actual}{size_note}",
        expected=expected,
        actual=actual,
    )


def commit_partial(
    store: Store,
    fd: int,
    partial: Path,
    *,
    sha256: str,
    size: int,
    url: str | None,
    locked: bool = True,
) -> Path:
    """Make the verified partial file ``partial`` (open as ``fd``) the blob ``sha256``.

    The caller has checked the digest (:func:`check_digest`). ``locked`` says
    whether the caller holds the blob's lock; if not, it is taken here, and a
    blob that another writer committed meanwhile wins (this copy is dropped).

    Returns:
        The blob's path.

    Raises:
        StoreError / StoreFull: the bytes could not be made durable.
    """
    try:
        if store.durable:
            os.fdatasync(fd)
        os.fchmod(fd, store.blob_mode)
    except OSError as exc:
        raise store.os_error(exc, f"committing {partial.name}") from exc
    dest = store.path_for(sha256)
    store.make_dirs(dest.parent)
    placed = True
    try:
        if locked:
            os.replace(partial, dest)
        else:
            try:
                with store.lock(sha256, timeout=30):
                    if dest.exists():
                        partial.unlink()
                        placed = False
                    else:
                        os.replace(partial, dest)
            except LockTimeout:
                partial.unlink()
                placed = False
    except OSError as exc:
        raise store.os_error(exc, f"committing {dest.name} into {dest.parent}") from exc
    if store.durable:
        with contextlib.suppress(OSError):
            fsync_dir(dest.parent)
    if dest.exists():
        store.index.record(sha256, size, url=url)
        if placed:  # the file as verified: a later change of it shows (see Store.verify)
            with contextlib.suppress(OSError):
                store.index.record_identity(sha256, file_identity(os.fstat(fd)))
    return dest
