"""The content-addressed store (CAS): verified blobs keyed by SHA-256.

Layout under the store root::

    sha256/ab/abcdef...      committed blobs, read-only, named by their digest
    partial/abcdef....part   an interrupted download, kept to resume with Range
    locks/abcdef....lock     per-artifact flock files (see :mod:`pixicache.store.locking`)
    quarantine/              blobs that failed ``verify``
    index.sqlite             url -> digest, size, first/last use (:mod:`pixicache.store.index`)

The contract, as in pooch's ``stream_download``: bytes stream into a partial
file while being hashed; only when the digest and size match the expected
ones is the file fsync'd and renamed into ``sha256/``
(:func:`pixicache.store.commit.commit_partial`, the one commit primitive, which
the mirror uses too). A wrong or partial file is never visible under a digest
name. A process that dies mid-download leaves only ``partial/``, which the next
writer resumes.

Several processes (HTCondor slots on one node) may share a store: a writer
holds the artifact's exclusive lock, so each artifact is downloaded once per
node and the others wait, then find it present. Readers hold a shared lock
(:meth:`Store.pin`) so ``gc`` never removes a blob in use.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pixicache.errors import StoreError, StoreFull
from pixicache.model.artifact import Artifact, is_sha256
from pixicache.store.index import Index
from pixicache.store.locking import FileLock, LockTimeout
from pixicache.store.writer import HASH_CHUNK, BlobWriter


def hash_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, as 64 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class StoreInfo:
    """What ``pixicache cache info`` reports."""

    root: Path
    blobs: int
    bytes: int
    partial_files: int
    partial_bytes: int
    quarantined: int
    urls: int


@dataclass
class VerifyReport:
    """The outcome of :meth:`Store.verify`."""

    checked: int = 0
    bytes: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (sha256, reason)


@dataclass
class GcReport:
    """The outcome of :meth:`Store.gc`."""

    removed: int = 0
    freed: int = 0
    kept_in_use: int = 0
    size_after: int = 0


class Store:
    """A content-addressed store rooted at a directory.

    Args:
        root: the store directory (created if missing).
        shared: make lock files writable by the group (for a store shared by
            several Unix users: see the README); default: the root's setgid bit.
        durable: fsync each blob (and its directory) before it becomes
            visible, so a power cut cannot leave a named blob with wrong bytes.
            Default true; ``PIXICACHE_FSYNC=0`` turns it off for scratch stores
            that do not outlive a job (then a crash can leave a bad blob, which
            ``cache verify`` finds; installs through rattler re-check digests).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        shared: bool | None = None,
        durable: bool | None = None,
    ) -> None:
        self.root = Path(root).expanduser().absolute()
        if durable is None:
            durable = os.environ.get("PIXICACHE_FSYNC", "1").lower() not in ("0", "false", "no")
        self.durable = durable
        self.blob_dir = self.root / "sha256"
        self.partial_dir = self.root / "partial"
        self.lock_dir = self.root / "locks"
        self.quarantine_dir = self.root / "quarantine"
        self.index_path = self.root / "index.sqlite"
        try:
            for d in (self.root, self.blob_dir, self.partial_dir, self.lock_dir, self.quarantine_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the store at {self.root}: {exc.strerror}. "
                "Set --cache-dir or PIXICACHE_CACHE_DIR to a writable directory."
            ) from exc
        if shared is None:
            shared = bool(self.root.stat().st_mode & stat.S_ISGID)
        self.shared = shared
        self.blob_mode = 0o444  # blobs are immutable; readable by every user of the node
        self.index = Index(self.index_path)
        self._init_index()

    # -- index ------------------------------------------------------------
    def _init_index(self) -> None:
        with FileLock(self.lock_dir / "index.lock", mode=self._lock_mode):
            self.index.create()

    def _db(self) -> sqlite3.Connection:
        """This thread's index connection (for maintenance and tests)."""
        return self.index.connection()

    def record(self, sha256: str, size: int, *, url: str | None = None) -> None:
        """Note that ``sha256`` (of ``size`` bytes) is present and was used now."""
        self.index.record(sha256, size, url=url)

    def touch(self, artifacts: Iterable[Artifact]) -> None:
        """Record a use of present artifacts (one transaction)."""
        self.index.touch((a.sha256, a.size or 0, a.url) for a in artifacts)

    def lookup_url(self, url: str) -> str | None:
        """The digest last stored for ``url``, if any."""
        return self.index.lookup_url(url)

    # -- files ------------------------------------------------------------
    def make_dirs(self, path: Path) -> None:
        """Create ``path`` (and its parents) inside the store."""
        path.mkdir(parents=True, exist_ok=True)

    def partial_path(self, name: str) -> Path:
        """The partial file of a download (``name``: a digest or a URL key)."""
        return self.partial_dir / f"{name}.part"

    def open_partial(self, path: Path) -> BinaryIO:
        """Open (or create) a partial file for appending and reading."""
        try:
            return open(path, "a+b")
        except OSError as exc:
            raise self.os_error(exc, f"opening {path.name}") from exc

    def os_error(self, exc: OSError, doing: str) -> StoreError:
        """The :class:`StoreError` (:class:`StoreFull` for ENOSPC/EDQUOT) for ``exc``."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreFull(
                f"no space left in the store {self.root} while {doing}: free space, lower "
                "--max-size, or run `pixicache cache gc`"
            )
        return StoreError(f"cannot write to the store {self.root} ({doing}): {exc}")

    # -- blobs ------------------------------------------------------------
    def path_for(self, sha256: str) -> Path:
        """Where the blob of ``sha256`` lives (whether or not it exists)."""
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.blob_dir / sha256[:2] / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        """True if the blob is present (and of ``size`` bytes, when given)."""
        try:
            st = self.path_for(sha256).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def lock(self, sha256: str, *, timeout: float | None = None) -> FileLock:
        """The exclusive lock a writer holds while filling ``sha256``."""
        return FileLock(self.lock_dir / f"{sha256}.lock", timeout=timeout, mode=self._lock_mode)

    @contextlib.contextmanager
    def pin(self, sha256: str) -> Iterator[Path]:
        """Hold a shared lock on a present blob while using it; yields its path.

        ``gc`` skips pinned blobs. Raises :class:`FileNotFoundError` if absent.
        """
        with FileLock(self.lock_dir / f"{sha256}.lock", shared=True, mode=self._lock_mode):
            path = self.path_for(sha256)
            if not path.exists():
                raise FileNotFoundError(path)
            yield path

    @property
    def _lock_mode(self) -> int:
        return 0o666 if self.shared else 0o644

    def writer(self, artifact: Artifact) -> BlobWriter:
        """A :class:`BlobWriter` for ``artifact``; hold :meth:`lock` around it."""
        return BlobWriter(self, artifact)

    def add_file(self, path: str | os.PathLike[str], artifact: Artifact) -> Path:
        """Copy a local file into the store, verifying it on the way."""
        with self.lock(artifact.sha256):
            if self.has(artifact.sha256, artifact.size):
                return self.path_for(artifact.sha256)
            w = self.writer(artifact)
            w.restart()
            with open(path, "rb") as src, w:
                while chunk := src.read(HASH_CHUNK):
                    w.write(chunk)
                return w.commit()

    def iter_blobs(self) -> Iterator[tuple[str, Path, os.stat_result]]:
        """Every committed blob: (sha256, path, stat)."""
        for sub in sorted(self.blob_dir.iterdir()):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if is_sha256(entry.name):
                    yield entry.name, Path(entry.path), entry.stat()

    # -- maintenance ------------------------------------------------------
    def info(self) -> StoreInfo:
        """Counts and sizes of what the store holds."""
        blobs = total = 0
        for _, _, st in self.iter_blobs():
            blobs += 1
            total += st.st_size
        parts = [p.stat().st_size for p in self.partial_dir.glob("*.part")]
        quarantined = sum(1 for _ in self.quarantine_dir.iterdir())
        urls = self.index.url_count()
        return StoreInfo(self.root, blobs, total, len(parts), sum(parts), quarantined, urls)

    def verify(self, digests: Iterable[str] | None = None, *, wait: float = 0) -> VerifyReport:
        """Re-hash every blob (or those of ``digests``); move bad ones to
        ``quarantine/`` and forget them.

        A blob that is being written or read is skipped, unless ``wait`` > 0:
        then verify waits up to that many seconds for it to become idle.
        """
        report = VerifyReport()
        if digests is None:
            blobs = list(self.iter_blobs())
        else:
            blobs = []
            for sha in set(digests):
                path = self.path_for(sha)
                with contextlib.suppress(FileNotFoundError):
                    blobs.append((sha, path, path.stat()))
        for sha, path, st in blobs:
            lock = self._lock_if_idle(sha, wait)
            if lock is None:
                continue  # being written or used right now: not ours to judge
            try:
                actual = hash_file(path)
                report.checked += 1
                report.bytes += st.st_size
                if actual != sha:
                    report.bad.append((sha, f"content hashes to {actual}"))
                    os.replace(path, self.quarantine_dir / f"{sha}.{int(time.time())}")
                    self._forget(sha)
            finally:
                lock.release()
        return report

    def _forget(self, sha256: str) -> None:
        self.index.forget(sha256)

    def _lock_if_idle(self, sha256: str, wait: float = 0) -> FileLock | None:
        """The artifact's exclusive lock if nobody writes or uses it (within
        ``wait`` seconds), else ``None``."""
        try:
            return self.lock(sha256, timeout=wait).acquire()
        except LockTimeout:
            return None

    def remove(self, sha256: str) -> bool:
        """Delete one blob unless it is in use; True if it was removed."""
        lock = self._lock_if_idle(sha256)
        if lock is None:
            return False
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path_for(sha256).unlink()
            self._forget(sha256)
            return True
        finally:
            lock.release()

    def gc(self, max_bytes: int) -> GcReport:
        """Remove least-recently-used blobs until the store holds <= ``max_bytes``.

        A blob that another process has pinned or is writing is never removed.
        """
        blobs = {sha: st for sha, _, st in self.iter_blobs()}
        total = sum(st.st_size for st in blobs.values())
        last_use = self.index.last_use()
        order = sorted(blobs, key=lambda s: last_use.get(s, blobs[s].st_mtime))
        report = GcReport()
        for sha in order:
            if total <= max_bytes:
                break
            size = blobs[sha].st_size
            if self.remove(sha):
                total -= size
                report.removed += 1
                report.freed += size
            else:
                report.kept_in_use += 1
        report.size_after = total
        return report

    def clear(self) -> None:
        """Delete everything (used by tests and ``cache clear``)."""
        shutil.rmtree(self.root, ignore_errors=True)
