"""The cache of parsed locks (``Lock.load_cached``, :mod:`pixicache.model.lockcache`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pixicache.errors import LockError
from pixicache.model import lockcache, lockyaml
from pixicache.model.lockfile import Lock

SHARED_LOCK = Path(__file__).resolve().parent.parent / "pixicache" / "data" / "gpu-pytorch-pixi.lock"


class _Parses:
    """Counts the YAML parses (the cache's misses)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = lockyaml.load_document

        def counted(text: str, path: str) -> object:
            self.count += 1
            return real(text, path)

        monkeypatch.setattr(lockyaml, "load_document", counted)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> _Parses:
    return _Parses(monkeypatch)


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.pickle"))


def _private(tmp_path: Path) -> Path:
    cache = tmp_path / "locks"
    cache.mkdir(mode=0o700)
    return cache


def test_a_lock_read_again_is_not_parsed_again(tmp_path: Path, parses: _Parses) -> None:
    cache = _private(tmp_path)
    first = Lock.load_cached(SHARED_LOCK, cache)
    assert parses.count == 1 and len(_entries(cache)) == 1
    assert os.stat(_entries(cache)[0]).st_mode & 0o777 == 0o600
    # another workspace with the same lock: no parse, and the lock names its own path
    other = tmp_path / "ws" / "pixi.lock"
    other.parent.mkdir()
    shutil.copy(SHARED_LOCK, other)
    second = Lock.load_cached(other, cache)
    assert parses.count == 1
    assert second.path == other
    assert second.artifacts("default", "linux-64") == first.artifacts("default", "linux-64")
    assert second.environments() == first.environments()


def test_a_changed_lock_is_parsed_afresh(tmp_path: Path, parses: _Parses) -> None:
    cache = _private(tmp_path)
    lock = tmp_path / "pixi.lock"
    shutil.copy(SHARED_LOCK, lock)
    before = Lock.load_cached(lock, cache)
    lock.write_text(lock.read_text() + "# a comment: other bytes, the same lock\n")
    Lock.load_cached(lock, cache)
    assert parses.count == 2 and len(_entries(cache)) == 2
    lock.write_text("version: 6\nenvironments: [\n")
    with pytest.raises(LockError, match="malformed YAML"):
        Lock.load_cached(lock, cache)
    assert len(_entries(cache)) == 2  # a failure is not cached
    assert before.path == lock


@pytest.mark.parametrize("how", ["group-writable", "link", "corrupt", "not-a-lock", "other-owner"])
def test_an_entry_that_is_not_this_users_alone_is_never_loaded(
    tmp_path: Path, parses: _Parses, how: str
) -> None:
    cache = _private(tmp_path)
    Lock.load_cached(SHARED_LOCK, cache)
    (entry,) = _entries(cache)
    if how == "group-writable":
        entry.chmod(0o620)
    elif how == "link":
        target = tmp_path / "elsewhere.pickle"
        entry.rename(target)
        entry.symlink_to(target)
    elif how == "corrupt":
        entry.write_bytes(entry.read_bytes()[:100])
    elif how == "not-a-lock":
        lockcache.write(entry, {"not": "a lock"})
    else:
        if os.getuid() != 0:
            pytest.skip("needs root to give the entry to another uid")
        os.chown(entry, 4101, -1)
    lock = Lock.load_cached(SHARED_LOCK, cache)
    assert parses.count == 2  # parsed again, not loaded
    assert lock.artifacts("default", "linux-64")


def test_no_cache_dir_or_an_unwritable_one_is_a_plain_load(tmp_path: Path, parses: _Parses) -> None:
    Lock.load_cached(SHARED_LOCK, None)
    Lock.load_cached(SHARED_LOCK, tmp_path / "missing")
    assert parses.count == 2


def test_the_cache_keeps_the_newest_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parses: _Parses
) -> None:
    cache = _private(tmp_path)
    monkeypatch.setattr(lockcache, "KEEP", 3)
    base = SHARED_LOCK.read_text()
    lock = tmp_path / "pixi.lock"
    for i in range(5):
        lock.write_text(base + f"# {i}\n")
        Lock.load_cached(lock, cache)
    assert len(_entries(cache)) == 3 and parses.count == 5
    Lock.load_cached(lock, cache)  # the newest is kept
    assert parses.count == 5

