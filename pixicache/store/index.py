"""The store's index: an SQLite database beside the blobs (``index.sqlite``, WAL mode).

It maps upstream URLs to digests and records each blob's size and first and
last use (``gc`` evicts by last use). It is a cache of facts the blobs
themselves prove: losing it loses no data (a blob is present when its file is),
and it is rebuilt as artifacts are used again.

One connection per thread (SQLite connections are not shared between threads);
the connection is opened on first use, so commands that only ask whether blobs
exist (``plan``) never open the database.

**Changes are never cut short by the process's end.** A process that dies inside a
write transaction leaves SQLite's rollback journal *hot*: the next connection must
play it back and then remove it. In a store shared by several users (``PERSIST``
journal, sticky root) only the journal's owner or root may remove it, so every other
user's jobs would fail on the index (``disk I/O error``) until one of them came by. So
changes are made one at a time per process (:meth:`Index._change`), and at exit
(``atexit``: after SIGTERM, as on an eviction, too) the process waits for the change
in progress, if any, and starts none after it: the fetch's worker threads are daemon
threads, which the end of the process would otherwise stop wherever they are. A
process killed outright (SIGKILL) can still leave a hot journal; the error then says
what it is and who can finish it.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pixicache.errors import StoreError, StoreFull

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    first_use REAL NOT NULL,
    last_use REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS urls (
    url TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_last_use ON blobs(last_use);
CREATE TABLE IF NOT EXISTS builds (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    uid INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    filename TEXT NOT NULL,
    PRIMARY KEY (source, target, uid)
);
CREATE TABLE IF NOT EXISTS identities (
    sha256 TEXT PRIMARY KEY,
    ident TEXT NOT NULL,
    verified REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS md5s (
    md5 TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (md5, size)
);
"""

_UPSERT_BLOB = (
    "INSERT INTO blobs(sha256, size, first_use, last_use) VALUES (?,?,?,?) "
    "ON CONFLICT(sha256) DO UPDATE SET last_use=excluded.last_use"
)


class Index:
    """The URL → digest and last-use records of one store.

    Args:
        path: the database file.
        prepare: called once, before the first connection is opened: creates the
            file with the store's mode and calls :meth:`create` (under the store's
            index lock). The database is not touched before it is first used.
        journal: SQLite's journal mode. ``WAL`` (readers never wait) for a store of
            one user; ``PERSIST`` for a store shared by several users: in WAL mode
            every connection maps the ``-shm`` file, which SQLite creates with the
            umask's mode and only then widens, so a second user opening it in that
            instant is silently read-only for good ("attempt to write a readonly
            database"); and a journal SQLite creates and deletes per transaction
            (``DELETE``) is a name another member could plant a link at, which
            SQLite would follow and write through. ``PERSIST`` keeps one journal file
            for good, made with the store's mode when the index is (the sticky store
            root keeps anyone else from replacing it), and a link found there is
            refused.
    """

    def __init__(
        self, path: Path, prepare: Callable[[], None] | None = None, *, journal: str = "WAL"
    ) -> None:
        self.path = path
        self.journal = journal
        self._local = threading.local()
        self._prepare = prepare
        self._prepared = prepare is None
        self._prepare_lock = threading.Lock()
        self._changing = threading.Lock()  # one change at a time; held for good at exit
        _watch(self)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use, after :attr:`prepare`)."""
        if not self._prepared:
            with self._prepare_lock:
                if not self._prepared:
                    assert self._prepare is not None
                    self._prepare()
                    self._prepared = True
        return self._open()

    @property
    def journal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-journal")

    def _open(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            for extra in (self.journal_path, self.path):
                try:
                    st = os.lstat(extra)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise StoreError(
                        f"{extra} is not a regular file (a link or something else was put "
                        f"there, owner uid {st.st_uid}): the index is not opened through it. "
                        "Remove it (as its owner or root)"
                    )
            try:
                conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                conn.execute("PRAGMA busy_timeout=60000")
                conn.execute("PRAGMA synchronous=NORMAL")
                if self.journal != "WAL":  # a rollback journal's mode is per connection
                    conn.execute(f"PRAGMA journal_mode={self.journal}")
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            self._local.conn = conn
        return conn

    def create(self) -> None:
        """Set the database up (WAL journal, tables); idempotent."""
        try:
            conn = self._open()
            conn.execute(f"PRAGMA journal_mode={self.journal}")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A connection for one write; SQLite's own errors become :class:`StoreError`."""
        try:
            yield self.connection()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    @contextmanager
    def _change(self) -> Iterator[sqlite3.Connection]:
        """:meth:`_write` for a statement or transaction that changes the index: one at a
        time in this process, and waited for (never cut short) at its exit."""
        with self._changing, self._write() as conn:
            yield conn

    def _quiesce(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the change in progress, then let none start
        (a change waited for in vain is one waiting for another process's lock: it has
        written nothing yet)."""
        self._changing.acquire(timeout=timeout)

    def _error(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in text:  # SQLITE_FULL
            return StoreFull(
                f"no space left in the store {self.path.parent} while updating its index "
                f"({text}): free space, lower --max-size, or run `pixicache cache gc`"
            )
        if "readonly" in text or "unable to open" in text:
            return StoreError(
                f"the store index {self.path} cannot be written by this user (uid "
                f"{os.getuid()}: {text}): give the store's group write access to it and to "
                "its -wal/-shm files (see 'A store shared by several users' in the README), "
                "or point PIXICACHE_CACHE_DIR at a store of your own"
            )
        owner = self._hot_journal_owner()
        if owner is not None:
            return StoreError(
                f"the store index {self.path} cannot be used ({text}): a process killed "
                f"while it changed the index left its journal {self.journal_path.name} "
                f"behind, which only its owner (uid {owner}) or root may remove in this "
                f"shared store. Run `pixicache cache info --cache-dir {self.path.parent}` "
                "once as root (or that user): it finishes the change and removes the journal"
            )
        return StoreError(
            f"the store index {self.path} is unusable ({text}); move it aside: "
            "it is rebuilt from the blobs as they are used"
        )

    def _hot_journal_owner(self) -> int | None:
        """The owner of a rollback journal a killed process left for this user to play
        back, when this user cannot remove it (another's, in a sticky directory)."""
        if self.journal == "WAL":
            return None
        try:
            st = os.lstat(self.journal_path)
            parent = os.stat(self.journal_path.parent)
            with open(self.journal_path, "rb") as fh:
                first = fh.read(1)
        except OSError:
            return None
        mine = st.st_uid == os.getuid() or os.getuid() == 0
        if not first or first == b"\0" or mine or not parent.st_mode & stat.S_ISVTX:
            return None
        return st.st_uid

    # -- records -----------------------------------------------------------------------
    def record(self, sha256: str, size: int, *, url: str | None = None) -> None:
        """Note that ``sha256`` (of ``size`` bytes) is present and was used now."""
        now = time.time()
        with self._change() as conn:
            conn.execute(_UPSERT_BLOB, (sha256, size, now, now))
            if url:
                conn.execute("INSERT OR REPLACE INTO urls(url, sha256) VALUES (?,?)", (url, sha256))

    def touch(self, rows: Iterable[tuple[str, int, str | None]]) -> None:
        """Record a use of present blobs: ``(sha256, size, url)`` rows, one transaction."""
        now = time.time()
        items = list(rows)
        with self._change() as conn:
            conn.execute("BEGIN")
            try:
                conn.executemany(_UPSERT_BLOB, [(s, n, now, now) for s, n, _ in items])
                conn.executemany(
                    "INSERT OR REPLACE INTO urls(url, sha256) VALUES (?,?)",
                    [(u, s) for s, _, u in items if u],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def forget(self, sha256: str) -> None:
        """Drop every record of ``sha256`` (the blob was removed or quarantined)."""
        with self._change() as conn:
            conn.execute("DELETE FROM blobs WHERE sha256=?", (sha256,))
            conn.execute("DELETE FROM urls WHERE sha256=?", (sha256,))
            conn.execute("DELETE FROM md5s WHERE sha256=?", (sha256,))
            conn.execute("DELETE FROM identities WHERE sha256=?", (sha256,))

    def record_identity(self, sha256: str, ident: str) -> None:
        """Note that the blob ``sha256`` was hashed (now) as the file ``ident`` (device,
        inode, size, mtime and ctime: :func:`pixicache.store.cas.file_identity`)."""
        with self._change() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO identities(sha256, ident, verified) VALUES (?,?,?)",
                (sha256, ident, time.time()),
            )

    def identity(self, sha256: str) -> tuple[str, float] | None:
        """``(identity, when verified)`` of the blob ``sha256``, if it was verified."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT ident, verified FROM identities WHERE sha256=?", (sha256,)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def verified_before(self, when: float) -> set[str]:
        """The blobs last verified before ``when`` (or never: not listed here)."""
        with self._write() as conn:
            rows = conn.execute("SELECT sha256 FROM identities WHERE verified < ?", (when,))
            return {r[0] for r in rows}

    def verified_digests(self) -> set[str]:
        with self._write() as conn:
            return {r[0] for r in conn.execute("SELECT sha256 FROM identities")}

    def record_md5(self, md5: str, size: int, sha256: str) -> None:
        """Note that the blob ``sha256`` is what an MD5-pinned artifact (``md5``, ``size``)
        turned out to be, verified by MD5 and size when it was committed."""
        with self._change() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO md5s(md5, size, sha256) VALUES (?,?,?)", (md5, size, sha256)
            )

    def record_build(self, source: str, target: str, sha256: str, filename: str) -> None:
        """Note that the sdist ``source`` (its digest), built for ``target`` by this uid,
        is the wheel blob ``sha256`` named ``filename``."""
        with self._change() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO builds(source, target, uid, sha256, filename) "
                "VALUES (?,?,?,?,?)",
                (source, target, os.getuid(), sha256, filename),
            )

    def lookup_build(self, source: str, target: str) -> tuple[str, str] | None:
        """``(wheel sha256, wheel file name)`` of a build of ``source`` for ``target`` made
        by this uid or by root: a wheel built from an sdist has no digest in the lock to
        check it against, so only builds this user could have made itself (or the site's
        administrator, warming the node) are trusted; another user's are not."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT sha256, filename FROM builds WHERE source=? AND target=? AND uid IN (?, 0) "
                "ORDER BY uid DESC",
                (source, target, os.getuid()),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def lookup_md5(self, md5: str, size: int | None) -> str | None:
        """The SHA-256 of the blob an MD5-pinned artifact was committed as, if any."""
        with self._write() as conn:
            if size is None:
                row = conn.execute("SELECT sha256 FROM md5s WHERE md5=?", (md5,)).fetchone()
            else:
                row = conn.execute(
                    "SELECT sha256 FROM md5s WHERE md5=? AND size=?", (md5, size)
                ).fetchone()
        return row[0] if row else None

    # -- queries -----------------------------------------------------------------------
    def lookup_url(self, url: str) -> str | None:
        """The digest last stored for ``url``, if any."""
        with self._write() as conn:
            row = conn.execute("SELECT sha256 FROM urls WHERE url=?", (url,)).fetchone()
        return row[0] if row else None

    def last_use(self) -> dict[str, float]:
        """``{sha256: last use}`` for every recorded blob."""
        with self._write() as conn:
            return dict(conn.execute("SELECT sha256, last_use FROM blobs").fetchall())

    def url_count(self) -> int:
        with self._write() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM urls").fetchone()[0])


_WATCHED: weakref.WeakSet[Index] = weakref.WeakSet()
_AT_EXIT: list[bool] = []  # _quiesce_all is registered with atexit (once)


def _watch(index: Index) -> None:
    """Have :func:`_quiesce_all` wait for ``index``'s changes at exit."""
    if not _AT_EXIT:
        import atexit

        atexit.register(_quiesce_all)
        _AT_EXIT.append(True)
    _WATCHED.add(index)


def _quiesce_all(timeout: float = 10.0) -> None:
    """At exit: wait for each index's change in progress (up to ``timeout`` s in all),
    then let none start (see the module doc)."""
    deadline = time.monotonic() + timeout
    for index in list(_WATCHED):
        index._quiesce(max(0.0, deadline - time.monotonic()))
    _WATCHED.clear()
