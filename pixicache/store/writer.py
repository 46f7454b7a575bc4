"""Streaming one artifact into the store: :class:`BlobWriter`."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pixicache.errors import IntegrityError, StoreFull
from pixicache.store.commit import check_digest, commit_partial

if TYPE_CHECKING:
    from pixicache.model.artifact import Artifact
    from pixicache.store.cas import Store

HASH_CHUNK = 1 << 20


class BlobWriter:
    """Streams one artifact into the store; obtain it from :meth:`Store.writer`.

    ``offset`` is where the partial file ends: a source may resume there with
    an HTTP Range request and :meth:`write` the rest, or call :meth:`restart`
    first to start from zero. :meth:`commit` verifies digest and size and makes
    the blob visible; leaving the context without commit keeps the partial
    file for a later resume (unless :meth:`discard` was called).

    Hold the artifact's lock (:meth:`Store.lock`) around a writer.
    """

    def __init__(self, store: Store, artifact: Artifact) -> None:
        self.store = store
        self.artifact = artifact
        self.partial_path: Path = store.partial_path(artifact.key)
        self._hash = hashlib.sha256()
        self._md5 = hashlib.md5() if artifact.md5_only else None
        self._fh: BinaryIO | None = None
        self.offset = 0
        self.resumed_from = 0
        self.written = 0  # bytes written through this writer (not resumed ones)
        self.on_write: Callable[[int], None] | None = None  # progress hook
        self._open()

    def _open(self) -> None:
        fh = self.store.open_partial(self.partial_path)
        fh.seek(0)
        size = 0
        while chunk := fh.read(HASH_CHUNK):
            self._update(chunk)
            size += len(chunk)
        expected = self.artifact.size
        if expected is not None and size > expected:
            fh.truncate(0)
            self._reset()
            size = 0
        fh.seek(size)
        self._fh = fh
        self.offset = self.resumed_from = size

    def _update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        if self._md5 is not None:
            self._md5.update(data)

    def _reset(self) -> None:
        self._hash = hashlib.sha256()
        self._md5 = hashlib.md5() if self.artifact.md5_only else None

    def reopen(self) -> None:
        """Start afresh after :meth:`discard` (e.g. to try another source)."""
        self.close()
        self._reset()
        self._open()

    def restart(self) -> None:
        """Forget the partial bytes and start the file from zero."""
        assert self._fh is not None
        self._fh.seek(0)
        self._fh.truncate(0)
        self._reset()
        if self.on_write is not None and self.offset:
            self.on_write(-self.offset)
        self.offset = 0
        self.resumed_from = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes (hashing them); raises :class:`StoreFull` on ENOSPC."""
        assert self._fh is not None
        n = len(data)
        expected = self.artifact.size
        if expected is not None and self.offset + n > expected:
            raise IntegrityError(
                f"{self.artifact.filename}: the source sent more than the "
                f"{expected} bytes the lock records",
                expected=self.artifact.key,
            )
        try:
            self._fh.write(data)
        except OSError as exc:
            self._fail(exc)
        self._update(data)
        self.offset += n
        self.written += n
        if self.on_write is not None:
            self.on_write(n)

    def _fail(self, exc: OSError) -> None:
        error = self.store.os_error(exc, f"writing {self.artifact.filename}")
        if isinstance(error, StoreFull):
            self.discard()
        raise error from exc

    def commit(self) -> Path:
        """Verify digest and size, then commit (:func:`~pixicache.store.commit.commit_partial`).

        On a mismatch the partial bytes are deleted and :class:`IntegrityError`
        names both digests.
        """
        assert self._fh is not None
        art = self.artifact
        sha = self._hash.hexdigest()
        try:
            if self._md5 is not None:  # pinned by MD5 alone: MD5 and size decide
                check_digest(
                    art.filename, expected=str(art.md5), actual=self._md5.hexdigest(),
                    size=self.offset, expected_size=art.size, kind="MD5",
                )  # fmt: skip
            else:
                check_digest(
                    art.filename, expected=str(art.sha256), actual=sha,
                    size=self.offset, expected_size=art.size,
                )  # fmt: skip
        except IntegrityError:
            self.discard()
            raise
        try:
            self._fh.flush()
        except OSError as exc:
            self._fail(exc)
        dest = commit_partial(
            self.store, self._fh.fileno(), self.partial_path,
            sha256=sha, size=self.offset, url=art.url, locked=not art.md5_only,
        )  # fmt: skip
        if art.md5 is not None:
            self.store.index.record_md5(art.md5, self.offset, sha)
        self._fh.close()
        self._fh = None
        return dest

    def discard(self) -> None:
        """Delete the partial bytes (used on a digest mismatch or bad data)."""
        self.close()
        if self.on_write is not None and self.offset:
            self.on_write(-self.offset)
        self.offset = 0
        with contextlib.suppress(FileNotFoundError):
            self.partial_path.unlink()

    def close(self) -> None:
        """Close the partial file (kept for a resume unless it is empty)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.flush()
            self._fh.close()
            self._fh = None
            if self.offset == 0:
                with contextlib.suppress(FileNotFoundError):
                    self.partial_path.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
