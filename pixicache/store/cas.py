"""The content-addressed store (CAS): verified blobs keyed by SHA-256.

Layout under the store root::

    sha256/ab/abcdef...      committed blobs, read-only, named by their digest
    partial/abcdef....part   an interrupted download, kept to resume with Range
    locks/abcdef....lock     per-artifact flock files (see :mod:`pixicache.store.locking`)
    quarantine/              blobs that failed ``verify``
    index.sqlite             url -> digest, size, first/last use (:mod:`pixicache.store.index`)
    pkgs/                    the extracted package cache the installers share

In a store shared by several users (:mod:`pixicache.store.files`), ``sha256/``,
``locks/``, ``quarantine/`` and the index are shared, and what belongs to one
user lives in that user's own area (:mod:`pixicache.userarea`, ``user.<uid>/``):
``partial/``, ``pkgs/``, ``bundle/``, ``pixi/``.

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
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pixicache.errors import StoreError, StoreFull
from pixicache.model.artifact import Artifact, is_sha256
from pixicache.store.files import (
    BLOB_MODE,
    PRIVATE_DIR_MODE,
    SHARED_DIR_MODE,
    SHARED_FILE_MODE,
    SHARED_TOP_DIR_MODE,
    NotRegular,
    check_private,
    create_exclusive,
    describe,
    file_identity,
    is_shared_dir,
    make_dir,
    open_leaf,
    open_regular,
    publish_new,
    sticky_if_mine,
)
from pixicache.store.index import Index
from pixicache.store.locking import FileLock, LockTimeout
from pixicache.store.writer import HASH_CHUNK, BlobWriter
from pixicache.userarea import user_area


def hash_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a regular file (never read through a link), as 64 hex digits."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@dataclass
class StoreInfo:
    """What ``pixicache cache info`` reports."""

    root: Path
    blobs: int
    bytes: int
    partial_files: int
    partial_bytes: int
    quarantined: int
    urls: int | None  # None: the index could not be read by this user


@dataclass
class VerifyReport:
    """The outcome of :meth:`Store.verify`."""

    checked: int = 0
    bytes: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (sha256, reason)
    due: int = 0  # how many blobs this pass set out to hash (after max_age / sample)


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
        shared: whether several users share it (see :mod:`pixicache.store.files`);
            default: read from the root's mode (setgid, sticky, or world-writable).
        durable: fsync each blob (and its directory) before it becomes
            visible, so a power cut cannot leave a named blob with wrong bytes.
            Default true; ``PIXICACHE_FSYNC=0`` turns it off for scratch stores
            that do not outlive a job (then a crash can leave a bad blob, which
            ``cache verify`` finds; installs through rattler re-check digests).

    Constructing a store writes nothing when it exists already, so a user who may
    only read it can still ask what it holds (``plan``, ``cache info``); the first
    write that this user may not do raises :class:`StoreError` naming the path and
    the fix.
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
        try:
            make_dir(self.root, 0o777 & ~_umask())
            st = os.stat(self.root)
        except (OSError, NotRegular) as exc:
            raise StoreError(
                f"cannot create the store at {self.root}: {getattr(exc, 'strerror', None) or exc}. "
                "Set --cache-dir or PIXICACHE_CACHE_DIR to a writable directory."
            ) from exc
        self.shared = is_shared_dir(st) if shared is None else shared
        self.blob_mode = BLOB_MODE  # blobs are immutable; readable by every user of the node
        self.dir_mode = SHARED_DIR_MODE if self.shared else 0o777 & ~_umask()
        # sha256/, locks/, quarantine/: sticky when shared (see pixicache.store.files)
        self.top_dir_mode = SHARED_TOP_DIR_MODE if self.shared else self.dir_mode
        self.file_mode = SHARED_FILE_MODE if self.shared else 0o666 & ~_umask()
        self.blob_dir = self.root / "sha256"
        self._blob_root = f"{self.blob_dir}{os.sep}"
        self.lock_dir = self.root / "locks"
        self.quarantine_dir = self.root / "quarantine"
        self.index_path = self.root / "index.sqlite"
        self._md5_checked: dict[tuple[str, str], bool] = {}
        self.user_dir = user_area(self.root, self.shared)
        self.partial_dir = self.user_dir / "partial"
        self.package_cache = self.user_dir / "pkgs"
        self.index = Index(
            self.index_path, prepare=self._prepare_index, journal="PERSIST" if self.shared else "WAL"
        )
        fresh = not os.path.lexists(self.blob_dir)
        for d in (self.blob_dir, self.lock_dir, self.quarantine_dir):
            with contextlib.suppress(OSError):  # a reader may not create them: fine until it writes
                make_dir(d, self.top_dir_mode, stop=self.root)
                if self.shared:
                    sticky_if_mine(d)
        if fresh and self.shared:
            # every fan-out directory at once, with the store's mode: no member can make
            # one first with a mode of its own (nor a link), and the sticky sha256/ keeps
            # them in place
            with contextlib.suppress(OSError):
                for i in range(256):
                    make_dir(self.blob_dir / f"{i:02x}", self.dir_mode, stop=self.root)
        with contextlib.suppress(OSError):
            self.private_dir(self.partial_dir)

    # -- index ------------------------------------------------------------
    def _prepare_index(self) -> None:
        """Create the index with the store's file mode (SQLite gives its -wal and
        -shm files the same mode) and set it up, once, under the index lock."""
        with contextlib.suppress(FileExistsError, PermissionError):
            publish_new(self.index_path, self.file_mode)
        if self.shared:  # the rollback journal exists for good, made by us (see Index)
            with contextlib.suppress(FileExistsError, PermissionError):
                publish_new(self.index.journal_path, self.file_mode)
        with FileLock(self.lock_dir / "index.lock", mode=self.file_mode):
            self.index.create()

    def _db(self) -> sqlite3.Connection:
        """This thread's index connection (for maintenance and tests)."""
        return self.index.connection()

    def record(self, sha256: str, size: int, *, url: str | None = None) -> None:
        """Note that ``sha256`` (of ``size`` bytes) is present and was used now."""
        self.index.record(sha256, size, url=url)

    def touch(self, artifacts: Iterable[Artifact]) -> None:
        """Record a use of present artifacts (one transaction)."""
        rows = []
        for a in artifacts:
            sha = self.blob_of(a)
            if sha is not None:
                rows.append((sha, a.size or 0, a.url))
        self.index.touch(rows)

    def blob_of(self, artifact: Artifact) -> str | None:
        """The SHA-256 of the blob that holds ``artifact``: its own, or for one pinned by
        MD5 alone, the digest its bytes had when they were committed (``None``: not yet)."""
        if artifact.sha256 is not None:
            return artifact.sha256
        assert artifact.md5 is not None
        try:
            sha = self.index.lookup_md5(artifact.md5, artifact.size)
        except StoreError:
            return None  # a reader that may not open the index: as if never fetched
        if sha is None or not self._md5_holds(sha, artifact.md5):
            return None
        return sha

    def _md5_holds(self, sha: str, md5: str) -> bool:
        """Whether blob ``sha`` has MD5 ``md5``: the index of a shared store is written by
        every user of the node, so a mapping is believed only once its blob is hashed
        (once per process). A mapping that lies reads as absent: the artifact is fetched
        again, verified by its MD5, and the mapping rewritten."""
        key = (sha, md5)
        known = self._md5_checked.get(key)
        if known is None:
            try:
                h = hashlib.md5()
                with os.fdopen(open_regular(self.path_for(sha)), "rb") as fh:
                    while chunk := fh.read(HASH_CHUNK):
                        h.update(chunk)
                known = h.hexdigest() == md5
            except OSError:
                return False  # not there (yet): not cached either
            self._md5_checked[key] = known
        return known

    def has_artifact(self, artifact: Artifact) -> bool:
        """True if ``artifact``'s blob is present, of its size (see :meth:`blob_of`)."""
        sha = self.blob_of(artifact)
        return sha is not None and self.has(sha, artifact.size)

    def lookup_url(self, url: str) -> str | None:
        """The digest last stored for ``url``, if any."""
        return self.index.lookup_url(url)

    # -- files ------------------------------------------------------------
    def make_dirs(self, path: Path) -> None:
        """Create ``path`` (and its parents) inside the store, with the store's mode."""
        try:
            make_dir(path, self.dir_mode, stop=self.root)
        except NotRegular as exc:
            raise StoreError(
                f"{exc.path} is {exc.what}: a store path was replaced by something else; "
                "remove it (as its owner or root)"
            ) from None
        except OSError as exc:
            raise self.os_error(exc, f"creating {path}") from exc

    def private_dir(self, path: Path) -> Path:
        """Create (if needed) and return a directory in this user's own area
        (:mod:`pixicache.userarea`), which must be this user's alone."""
        if self.user_dir != self.root:
            make_dir(self.user_dir, PRIVATE_DIR_MODE)
            try:
                check_private(self.user_dir)
            except NotRegular as exc:
                raise StoreError(
                    f"{exc.path} is {exc.what}: pixicache keeps this user's partial downloads, "
                    "package cache and unpacked agent there, so it refuses it. Remove it (as its "
                    "owner or root); see 'A store shared by several users' in the README"
                ) from None
        make_dir(path, self.dir_mode if self.user_dir == self.root else PRIVATE_DIR_MODE, stop=self.user_dir)
        return path

    def partial_path(self, name: str) -> Path:
        """The partial file of a download (``name``: a digest or a URL key)."""
        return self.partial_dir / f"{name}.part"

    def open_partial(self, path: Path) -> BinaryIO:
        """Open (or create) a partial file for appending and reading; never through a
        link (one planted there is removed and the file started afresh)."""
        try:
            self.private_dir(path.parent)
            try:
                fd = open_regular(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, self.file_mode)
            except NotRegular:
                os.unlink(path)  # a link or special file where our partial goes: never ours
                fd = create_exclusive(path, self.file_mode, os.O_RDWR | os.O_APPEND)
        except (OSError, NotRegular) as exc:
            raise self.os_error(exc, f"opening {path.name}") from exc
        return os.fdopen(fd, "a+b")

    def os_error(self, exc: OSError, doing: str) -> StoreError:
        """The :class:`StoreError` (:class:`StoreFull` for ENOSPC/EDQUOT) for ``exc``."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreFull(
                f"no space left in the store {self.root} while {doing}: free space, lower "
                "--max-size, or run `pixicache cache gc`"
            )
        if isinstance(exc, PermissionError):
            return StoreError(
                f"this user (uid {os.getuid()}) cannot write to the store {self.root} "
                f"({doing}: {exc.strerror}): make it usable by the group of its users (see "
                "'A store shared by several users' in the README) or point "
                "PIXICACHE_CACHE_DIR at a store of your own"
            )
        return StoreError(f"cannot write to the store {self.root} ({doing}): {exc}")

    # -- blobs ------------------------------------------------------------
    @staticmethod
    def fanout(sha256: str) -> str:
        """The name of the fan-out directory of the blob ``sha256`` (its first two hex
        digits); raises ``ValueError`` for anything that is not a digest (a digest is
        then safe as a file name relative to that directory)."""
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return sha256[:2]

    def path_for(self, sha256: str) -> Path:
        """Where the blob of ``sha256`` lives (whether or not it exists)."""
        return self.blob_dir / self.fanout(sha256) / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        """True if the blob is present as a regular file (of ``size`` bytes, when given).

        A link or special file at a blob's path is not a blob (see :meth:`check`), and
        nor is anything below a fan-out directory that is a link.
        """
        fanout = f"{self._blob_root}{self.fanout(sha256)}"  # strings, not Paths: per artifact
        try:
            if not stat.S_ISDIR(os.lstat(fanout).st_mode):
                return False
            st = os.lstat(f"{fanout}/{sha256}")
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return False
        return stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size)

    def check(self, sha256: str, size: int | None = None) -> str | None:
        """Why the entry at a blob's path is not a usable blob, or ``None`` (it is, or
        nothing is there): a link, a special file, or the wrong size."""
        try:
            st = os.lstat(self.path_for(sha256))
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return f"{describe(st)} (owner uid {st.st_uid}) stands where the blob belongs"
        if size is not None and st.st_size != size:
            return f"it holds {st.st_size} bytes, not the {size} the lock records"
        return None

    def open_blob(self, sha256: str, size: int | None = None) -> BinaryIO:
        """Open a present blob for reading: a regular file of ``size`` bytes, never a link.

        Raises:
            FileNotFoundError: the blob is absent.
            NotRegular: a link or special file stands there, or the size is wrong.
        """
        path = self.path_for(sha256)
        fd = open_leaf(path)
        have = os.fstat(fd).st_size
        if size is not None and have != size:
            os.close(fd)
            raise NotRegular(path, f"a file of {have} bytes (the lock records {size})")
        return os.fdopen(fd, "rb")

    def lock(self, key: str, *, timeout: float | None = None) -> FileLock:
        """The exclusive lock a writer holds while filling ``key`` (a SHA-256, or an
        :attr:`Artifact.key`)."""
        return FileLock(self.lock_dir / f"{key}.lock", timeout=timeout, mode=self.file_mode)

    @contextlib.contextmanager
    def pin(self, sha256: str) -> Iterator[Path]:
        """Hold a shared lock on a present blob while using it; yields its path.

        ``gc`` skips pinned blobs. Raises :class:`FileNotFoundError` if absent.
        """
        with FileLock(self.lock_dir / f"{sha256}.lock", shared=True, mode=self.file_mode):
            path = self.path_for(sha256)
            if not self.has(sha256):
                raise FileNotFoundError(path)
            yield path

    @property
    def _lock_mode(self) -> int:
        return self.file_mode

    def writer(self, artifact: Artifact) -> BlobWriter:
        """A :class:`BlobWriter` for ``artifact``; hold :meth:`lock` around it."""
        return BlobWriter(self, artifact)

    def add_file(self, path: str | os.PathLike[str], artifact: Artifact) -> Path:
        """Copy a local file into the store, verifying it on the way."""
        with self.lock(artifact.key):
            sha = self.blob_of(artifact)
            if sha is not None and self.has(sha, artifact.size):
                return self.path_for(sha)
            w = self.writer(artifact)
            w.restart()
            with open(path, "rb") as src, w:
                while chunk := src.read(HASH_CHUNK):
                    w.write(chunk)
                return w.commit()

    def add_built(self, path: Path) -> str:
        """Commit a file made on this node (a wheel built from an sdist); its SHA-256."""
        sha = hash_file(path)
        size = path.stat().st_size
        self.add_file(path, Artifact(path.as_uri(), sha, size, path.name, kind="pypi"))
        return sha

    def iter_blobs(self) -> Iterator[tuple[str, Path, os.stat_result]]:
        """Every committed blob: (sha256, path, stat); links and special files are skipped."""
        try:
            subs = sorted(os.scandir(self.blob_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for sub in subs:
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                if is_sha256(entry.name) and entry.is_file(follow_symlinks=False):
                    yield entry.name, Path(entry.path), entry.stat(follow_symlinks=False)

    # -- maintenance ------------------------------------------------------
    def info(self) -> StoreInfo:
        """Counts and sizes of what the store holds."""
        blobs = total = 0
        for _, _, st in self.iter_blobs():
            blobs += 1
            total += st.st_size
        parts = [p.stat().st_size for p in self.partial_dir.glob("*.part")]
        quarantined = sum(1 for _ in self.quarantine_dir.iterdir()) if self.quarantine_dir.is_dir() else 0
        try:
            urls: int | None = self.index.url_count()
        except StoreError:
            urls = None  # a reader that may not open the index

        return StoreInfo(self.root, blobs, total, len(parts), sum(parts), quarantined, urls)

    def verify(
        self,
        digests: Iterable[str] | None = None,
        *,
        wait: float = 0,
        max_age: float | None = None,
        sample: float | None = None,
        seed: int | None = None,
    ) -> VerifyReport:
        """Re-hash every blob (or those of ``digests``); move bad ones to
        ``quarantine/`` and forget them. Anything but a regular file at a blob's path
        (a planted link) is bad too, whatever it points to. Each good blob's file
        identity (:func:`file_identity`) and the time are recorded.

        A blob that is being written or read is skipped, unless ``wait`` > 0:
        then verify waits up to that many seconds for it to become idle. A blob
        that another process removed or quarantined meanwhile is skipped.

        Args:
            max_age: skip blobs verified less than this many seconds ago whose file is
                unchanged since (same identity): a scheduled pass re-hashes what is due.
            sample: of the blobs still due, hash this fraction (0-1, at least one),
                picked at random (``seed``): a bounded pass per run.

        Raises:
            StoreError: a bad blob cannot be moved aside (the message names it).
        """
        report = VerifyReport()
        if digests is None:
            names = [sha for sha, _, _ in self.iter_blobs()]
            names += self._non_regular_blobs()
        else:
            names = sorted(set(digests))
        if max_age is not None:
            names = [n for n in names if self._due(n, max_age)]
        if sample is not None and names:
            import random

            k = max(1, round(len(names) * min(max(sample, 0.0), 1.0)))
            names = sorted(random.Random(seed).sample(names, min(k, len(names))))
        report.due = len(names)
        for sha in names:
            if not os.path.lexists(self.path_for(sha)):
                continue
            lock = self._lock_if_idle(sha, wait)
            if lock is None:
                continue  # being written or used right now: not ours to judge
            try:
                self._verify_one(sha, report)
            finally:
                lock.release()
        return report

    def _due(self, sha: str, max_age: float) -> bool:
        """Whether ``sha`` needs hashing: never verified, verified too long ago, or its
        file changed since."""
        try:
            known = self.index.identity(sha)
            st = os.lstat(self.path_for(sha))
        except (StoreError, OSError):
            return True
        if known is None or time.time() - known[1] > max_age:
            return True
        return known[0] != file_identity(st)

    def _verify_one(self, sha: str, report: VerifyReport) -> None:
        path = self.path_for(sha)
        ident = None
        try:
            st = os.lstat(path)
            why = None if stat.S_ISREG(st.st_mode) else self.check(sha)
            if why is None:
                with os.fdopen(open_leaf(path), "rb") as fh:
                    ident = file_identity(os.fstat(fh.fileno()))
                    h = hashlib.sha256()
                    while chunk := fh.read(HASH_CHUNK):
                        h.update(chunk)
                actual = h.hexdigest()
                report.checked += 1
                report.bytes += st.st_size
                why = None if actual == sha else f"content hashes to {actual}"
        except FileNotFoundError:
            return  # a neighbour quarantined or removed it meanwhile
        except NotRegular as exc:
            why = f"{exc.path} is {exc.what}"
        if why is None:
            if ident is not None:
                with contextlib.suppress(StoreError):
                    self.index.record_identity(sha, ident)
            return
        report.bad.append((sha, why))
        try:
            os.replace(path, self.quarantine_dir / f"{sha}.{int(time.time())}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(
                f"the blob {path} is bad ({why}) and cannot be moved to {self.quarantine_dir}: "
                f"{exc.strerror}. Remove it (as its owner or root)"
            ) from None
        self._forget(sha)

    def _non_regular_blobs(self) -> list[str]:
        """Names at blob paths that are not regular files (links, directories...)."""
        out: list[str] = []
        try:
            subs = list(os.scandir(self.blob_dir))
        except FileNotFoundError:
            return out
        for sub in subs:
            if sub.is_dir(follow_symlinks=False):
                out += [
                    e.name
                    for e in os.scandir(sub.path)
                    if is_sha256(e.name) and not e.is_file(follow_symlinks=False)
                ]
        return out

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
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)
