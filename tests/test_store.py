"""The content-addressed store: commit contract, index, locks, gc, verify."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time

import pytest

from pixicache.errors import IntegrityError
from pixicache.store import Store, hash_file
from pixicache.store.locking import FileLock, LockTimeout

from .helpers import artifact_for


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


def test_commit_makes_a_read_only_blob_and_indexes_the_url(store):
    data = os.urandom(3 << 20)
    art = artifact_for(data)
    with store.lock(art.sha256):
        w = store.writer(art)
        w.write(data[:1000])
        w.write(data[1000:])
        path = w.commit()
    assert path == store.path_for(art.sha256)
    assert path.read_bytes() == data
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert store.has(art.sha256, len(data))
    assert not store.has(art.sha256, len(data) + 1)
    assert store.lookup_url(art.url) == art.sha256
    assert not list(store.partial_dir.iterdir())


def test_wrong_bytes_are_never_visible_and_the_error_names_both_digests(store):
    art = artifact_for(b"the right bytes")
    bad = b"the wrong bytes"
    w = store.writer(art)
    w.write(bad)
    with pytest.raises(IntegrityError) as err:
        w.commit()
    msg = str(err.value)
    assert art.sha256 in msg and hashlib.sha256(bad).hexdigest() in msg
    assert art.filename in msg
    assert not store.has(art.sha256)
    assert not list(store.blob_dir.rglob("*")) or all(p.is_dir() for p in store.blob_dir.rglob("*"))
    assert not (store.partial_dir / f"{art.sha256}.part").exists()


def test_more_bytes_than_the_lock_records_is_an_integrity_error(store):
    art = artifact_for(b"12345")
    w = store.writer(art)
    with pytest.raises(IntegrityError, match="more than the 5 bytes"):
        w.write(b"123456")


def test_an_uncommitted_write_is_kept_as_partial_and_resumed(store):
    data = os.urandom(100_000)
    art = artifact_for(data)
    w = store.writer(art)
    w.write(data[:40_000])
    w.close()  # a crash: no commit
    assert not store.has(art.sha256)
    w2 = store.writer(art)
    assert w2.offset == 40_000 and w2.resumed_from == 40_000
    w2.write(data[40_000:])
    w2.commit()
    assert hash_file(store.path_for(art.sha256)) == art.sha256
    assert w2.written == 60_000


def test_a_partial_longer_than_the_artifact_is_dropped(store):
    art = artifact_for(b"abc")
    (store.partial_dir / f"{art.sha256}.part").write_bytes(b"abcdef")
    w = store.writer(art)
    assert w.offset == 0
    w.write(b"abc")
    w.commit()


def test_gc_removes_least_recently_used_first_and_never_a_pinned_blob(store):
    blobs = [os.urandom(1000) for _ in range(4)]
    arts = [artifact_for(b, url=f"https://h/c/linux-64/p{i}-1-0.conda") for i, b in enumerate(blobs)]
    for i, (a, b) in enumerate(zip(arts, blobs)):
        w = store.writer(a)
        w.write(b)
        w.commit()
        store._db().execute("UPDATE blobs SET last_use=? WHERE sha256=?", (1000 + i, a.sha256))
    with store.pin(arts[0].sha256):  # oldest, but in use
        rep = store.gc(2000)
    assert rep.kept_in_use == 1
    assert store.has(arts[0].sha256)
    assert not store.has(arts[1].sha256) and not store.has(arts[2].sha256)
    assert store.has(arts[3].sha256)
    assert rep.removed == 2 and rep.freed == 2000 and rep.size_after == 2000


def test_verify_quarantines_a_corrupted_blob(store):
    good, bad = artifact_for(b"good"), artifact_for(b"will rot", url="https://h/c/noarch/x-1-0.conda")
    for art, data in ((good, b"good"), (bad, b"will rot")):
        w = store.writer(art)
        w.write(data)
        w.commit()
    path = store.path_for(bad.sha256)
    os.chmod(path, 0o644)
    path.write_bytes(b"bit rot!")
    rep = store.verify()
    assert rep.checked == 2
    assert [sha for sha, _ in rep.bad] == [bad.sha256]
    assert not store.has(bad.sha256) and store.has(good.sha256)
    assert len(list(store.quarantine_dir.iterdir())) == 1
    assert store.lookup_url(bad.url) is None


def test_info_counts_blobs_and_partials(store):
    art = artifact_for(b"x" * 10)
    w = store.writer(art)
    w.write(b"x" * 10)
    w.commit()
    w = store.writer(artifact_for(b"y" * 10, url="https://h/c/noarch/y-1-0.conda"))
    w.write(b"y" * 4)
    w.close()
    info = store.info()
    assert (info.blobs, info.bytes, info.partial_files, info.partial_bytes) == (1, 10, 1, 4)


def test_locks_exclude_other_processes_and_are_dropped_when_the_holder_dies(tmp_path):
    lock_path = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pixicache.store.locking import FileLock; import sys, time\n"
         f"l = FileLock({str(lock_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout):
            FileLock(lock_path, timeout=0).acquire()
        with pytest.raises(LockTimeout):
            FileLock(lock_path, shared=True, timeout=0.05).acquire()
        holder.kill()  # kill -9: the kernel drops the flock
        holder.wait()
        t0 = time.monotonic()
        with FileLock(lock_path, timeout=5):
            pass
        assert time.monotonic() - t0 < 5
    finally:
        if holder.poll() is None:
            holder.kill()


def test_shared_locks_coexist_but_exclude_a_writer(tmp_path):
    p = tmp_path / "y.lock"
    with FileLock(p, shared=True), FileLock(p, shared=True, timeout=0):  # noqa: SIM117
        with pytest.raises(LockTimeout):
            FileLock(p, timeout=0).acquire()


def test_an_index_write_on_a_full_disk_is_store_full_not_a_broken_index(tmp_path, monkeypatch):
    """SQLite says "database or disk is full" when the disk fills under the index: that
    is the store being full (exit 7, free space), never "the index is unusable, move it
    aside" (which would throw away a sound index)."""
    import sqlite3

    from pixicache.errors import StoreFull

    store = Store(tmp_path / "s")

    class FullConnection:
        def execute(self, *args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store.index, "connection", lambda: FullConnection())
    with pytest.raises(StoreFull, match="no space left in the store") as info:
        store.index.record("ab" * 32, 10)
    assert "move it aside" not in str(info.value)
