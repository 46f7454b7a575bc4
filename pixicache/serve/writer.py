"""Streaming an upstream body into the store, for a fill that other requests read as it grows.

:class:`FillWriter` keeps the store's contract (the same one as
:class:`pixicache.store.BlobWriter`): bytes go to ``partial/`` while being
hashed; only a body whose digest is right is fsync'd and renamed into
``sha256/``. It differs from ``BlobWriter`` in what the server needs:

* every :meth:`write` reaches the kernel at once (an unbuffered fd), so
  readers tailing the partial file with ``pread``/``sendfile`` see each byte
  as soon as :meth:`write` returns;
* :meth:`hexdigest` is available before :meth:`commit`, so clients get the
  last byte as soon as the digest is known to be right, not after the fsync;
* the digest may be unknown in advance (a channel-path request without
  ``x-expected-sha256``): the file is then named after the URL and committed
  under the digest it turns out to have.

A known-digest partial file is the same ``partial/<sha256>.part`` that the
agent's fetcher writes, under the same per-artifact lock, so a server and the
agents of its node resume each other's interrupted downloads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pixicache.errors import StoreFull
from pixicache.model.artifact import is_sha256
from pixicache.store import HASH_CHUNK, Store
from pixicache.store.commit import commit_partial
from pixicache.store.files import NotRegular, create_exclusive, open_regular
from pixicache.store.locking import FileLock


def _pwritev_fallback(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
    """``pwritev`` for systems without it (one ``pwrite`` per buffer)."""
    done = 0
    for buf in buffers:
        n = os.pwrite(fd, buf, offset + done)
        done += n
        if n < len(buf):
            break
    return done


_pwritev = getattr(
    os, "pwritev", _pwritev_fallback
)  # writes every fill byte (tests simulate ENOSPC here)
_IOV_MAX = 512


def url_key(url: str) -> str:
    """The name of an unknown-digest fill's partial and lock files."""
    return "url-" + hashlib.sha256(url.encode()).hexdigest()[:40]


def lock_mode(store: Store) -> int:
    return store.file_mode


def fill_lock(store: Store, expected: str | None, url: str) -> FileLock:
    """The lock a fill holds: the store's per-artifact lock, or one per URL."""
    if expected is not None:
        return store.lock(expected)
    return FileLock(store.lock_dir / f"{url_key(url)}.lock", mode=lock_mode(store))


class FillWriter:
    """Writes one fill's body into ``partial/`` (blocking calls: run them in a thread).

    Args:
        store: the store.
        url: the upstream URL (recorded in the index on commit).
        expected: the digest the body must have, or ``None`` if unknown.
        resume: keep the bytes of an earlier partial file of ``expected``
            (re-hashing them) so the caller can ask upstream for the rest.
    """

    def __init__(
        self, store: Store, url: str, expected: str | None, *, resume: bool = True
    ) -> None:
        self.store = store
        self.url = url
        self.expected = expected
        name = expected if expected is not None else url_key(url)
        self.partial_path: Path = store.partial_path(name)
        self._hash = hashlib.sha256()
        self._md5: Any = None  # hashed too when a fill is verified by MD5 (want_md5)
        self.offset = 0
        self._fd: int | None = None
        try:
            store.private_dir(self.partial_path.parent)
            try:
                self._fd = open_regular(self.partial_path, os.O_RDWR | os.O_CREAT, store.file_mode)
            except NotRegular:  # a planted link or special file: never ours to write through
                os.unlink(self.partial_path)
                self._fd = create_exclusive(self.partial_path, store.file_mode)
        except OSError as exc:
            self._raise_os(exc)
        if resume and expected is not None:
            while True:
                chunk = os.pread(self.fd, HASH_CHUNK, self.offset)
                if not chunk:
                    break
                self._hash.update(chunk)
                self.offset += len(chunk)
        else:
            os.ftruncate(self.fd, 0)
        self.resumed_from = self.offset

    @property
    def fd(self) -> int:
        assert self._fd is not None, "writer is closed"
        return self._fd

    def open_reader(self) -> int:
        """A new read-only fd on the partial file (it survives the commit's rename)."""
        return open_regular(self.partial_path)

    def append(self, chunks: Sequence[bytes | bytearray | memoryview]) -> int:
        """Write ``chunks`` at the end of the file (``pwritev``, no copy); return the new offset.

        The bytes are *not* hashed here: call :meth:`hash_chunks` with the same
        chunks, in order (possibly in another thread, concurrently). Raises
        :class:`StoreFull` on ENOSPC/EDQUOT.
        """
        pos = self.offset
        bufs = [memoryview(c) for c in chunks if len(c)]
        try:
            while bufs:
                n = _pwritev(self.fd, bufs[:_IOV_MAX], pos)
                pos += n
                while n and bufs:
                    head = len(bufs[0])
                    if n >= head:
                        n -= head
                        bufs.pop(0)
                    else:
                        bufs[0] = bufs[0][n:]
                        n = 0
        except OSError as exc:
            self._raise_os(exc)
        self.offset = pos
        return pos

    def want_md5(self) -> None:
        """Also compute the MD5 (a package the channel pins by MD5 alone); call before
        the first byte (an unknown-digest fill never resumes)."""
        self._md5 = hashlib.md5()

    def md5_hexdigest(self) -> str | None:
        return None if self._md5 is None else self._md5.hexdigest()

    def hash_chunks(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        """Feed ``chunks`` (the ones given to :meth:`append`, in order) to the digest."""
        for chunk in chunks:
            self._hash.update(chunk)
            if self._md5 is not None:
                self._md5.update(chunk)

    def write_batch(self, chunks: Sequence[bytes | bytearray | memoryview]) -> int:
        """:meth:`append` then :meth:`hash_chunks` the same buffers (one thread hop per
        batch); returns the new offset."""
        offset = self.append(chunks)
        self.hash_chunks(chunks)
        return offset

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append and hash ``data``; raises :class:`StoreFull` on ENOSPC/EDQUOT."""
        self.append([data])
        self.hash_chunks([data])
        return len(data)

    def restart(self) -> None:
        """Forget the bytes so far (upstream ignored a Range request)."""
        os.ftruncate(self.fd, 0)
        self._hash = hashlib.sha256()
        if self._md5 is not None:
            self._md5 = hashlib.md5()
        self.offset = self.resumed_from = 0

    def hexdigest(self) -> str:
        """The SHA-256 of the bytes written so far."""
        return self._hash.hexdigest()

    def commit(self, digest: str) -> Path:
        """Commit the body as blob ``digest`` (:func:`~pixicache.store.commit.commit_partial`).

        ``digest`` must be :meth:`hexdigest` (checked by the caller against
        the expected one). For an unknown-digest fill the blob's lock is taken
        around the rename; if another process is writing the same blob right
        now, its copy wins and this one is dropped.
        """
        assert is_sha256(digest) and digest == self.hexdigest()
        dest = commit_partial(
            self.store, self.fd, self.partial_path,
            sha256=digest, size=self.offset, url=self.url, locked=self.expected is not None,
        )
        self.close()
        return dest

    def discard(self) -> None:
        """Delete the partial file (bad bytes, or an unknown-digest fill that failed)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.partial_path.unlink()

    def close(self) -> None:
        """Close the file; an empty partial file is removed, others kept for a resume."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            if self.offset == 0:
                with contextlib.suppress(FileNotFoundError):
                    self.partial_path.unlink()

    def _raise_os(self, exc: OSError) -> None:
        error = self.store.os_error(exc, f"filling {self.url}")
        if isinstance(error, StoreFull):
            self.discard()
        raise error from exc
