"""The verified Pixi binary: pinned archive → store → unpacked → smoke-run.

No real Pixi exists on this machine: the archives are built here and hold a
stand-in ``pixi`` script that answers ``--version``. They are served by the
real test upstream (:class:`UpstreamServer`) and the pin table is overridden
with ``PIXICACHE_PIXI_PINS``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import stat
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from pixicache.backends.pixi.binary import (
    binary_path,
    find_pixi_on_path,
    known_binaries,
    locate_pixi,
    obtain_pixi,
    verify_pixi_executable,
)
from pixicache.backends.pixi.pins import this_target
from pixicache.cli.pixi import pixi_group
from pixicache.errors import ConfigError, IntegrityError, PixiVerificationError
from pixicache.sources import parse_sources
from pixicache.store import Store
from pixicache.testing.server import UpstreamServer

VERSION = "0.79.0"


def standin_script(version_line: str = f"pixi {VERSION}", body: str = "") -> bytes:
    """A stand-in ``pixi``: a Python script answering ``--version``, then ``body``."""
    return (
        f"#!{sys.executable} -S\n"
        "import sys\n"
        "if sys.argv[1:] == ['--version']:\n"
        f"    print({version_line!r})\n"
        "    sys.exit(0)\n"
        f"{body}\n"
    ).encode()


def make_archive(members: list[tuple[str, bytes | None, str]]) -> bytes:
    """A tar.gz of ``(name, data, kind)`` members; kind is file, dir or symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if kind == "file":
                info.size = len(data or b"")
                info.mode = 0o755
                tf.addfile(info, io.BytesIO(data or b""))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = (data or b"/bin/sh").decode()
                tf.addfile(info)
    return buf.getvalue()


def pixi_archive(script: bytes | None = None) -> bytes:
    return make_archive([("pixi", script or standin_script(), "file")])


class PixiRelease:
    """A stand-in Pixi release served by a real local upstream, pinned by a temp pin table."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self.root = tmp / "upstream"
        self.monkeypatch = monkeypatch
        self.target = this_target()
        self.rel = f"prefix-dev/pixi/releases/download/v{VERSION}/pixi-{self.target}.tar.gz"
        self.root.mkdir(parents=True, exist_ok=True)
        self.server = UpstreamServer(self.root).start()
        self.pins_file = tmp / "pins.toml"
        monkeypatch.setenv("PIXICACHE_PIXI_PINS", str(self.pins_file))
        monkeypatch.setenv("PIXICACHE_CONFIG", str(tmp / "no-config.toml"))

    @property
    def url(self) -> str:
        return f"{self.server.url}/{self.rel}"

    def publish(self, data: bytes, *, pinned: bytes | None = None, version: str = VERSION) -> str:
        """Serve ``data`` and pin the digest of ``pinned`` (default: ``data``)."""
        path = self.root / self.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        sha = hashlib.sha256(pinned if pinned is not None else data).hexdigest()
        self.pins_file.write_text(
            f'default_version = "{version}"\n[[pin]]\nversion = "{version}"\n'
            f'target = "{self.target}"\nsha256 = "{sha}"\nurl = "{self.url}"\n'
        )
        return sha

    def sources(self) -> list:
        return parse_sources(["upstream"])

    def close(self) -> None:
        self.server.stop()


@pytest.fixture
def release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    rel = PixiRelease(tmp_path, monkeypatch)
    yield rel
    rel.close()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_good_archive_is_fetched_verified_unpacked_and_smoke_run(release, store):
    script = standin_script()
    archive_sha = release.publish(pixi_archive(script))

    v = obtain_pixi(store, release.sources())

    assert v.path == binary_path(store, VERSION, release.target)
    assert v.path.read_bytes() == script
    assert os.access(v.path, os.X_OK)
    assert (v.version, v.source, v.archive_sha256) == (VERSION, "pin", archive_sha)
    assert v.sha256 == hashlib.sha256(script).hexdigest()
    assert store.has(archive_sha)
    assert sorted(p.name for p in v.path.parent.iterdir()) == ["pixi", "record.json"]
    assert known_binaries(store)[v.sha256]["archive_sha256"] == archive_sha
    assert release.server.count(f"/{release.rel}", method="GET") == 1

    # a second call re-hashes the unpacked binary: no request, no re-extraction
    again = obtain_pixi(store, release.sources())
    assert again == v
    assert release.server.count(f"/{release.rel}") == 1


def test_tampered_archive_is_refused_and_nothing_is_unpacked(release, store):
    good = pixi_archive()
    release.publish(pixi_archive(standin_script(body="print('evil')")), pinned=good)

    with pytest.raises(PixiVerificationError) as err:
        obtain_pixi(store, release.sources())

    assert isinstance(err.value, IntegrityError)
    assert err.value.exit_code == 4
    assert hashlib.sha256(good).hexdigest() in str(err.value)
    assert "does not match its pin" in str(err.value)
    assert not (store.root / "pixi" / VERSION).exists()
    assert store.info().blobs == 0


def test_wrong_version_binary_is_refused(release, store):
    release.publish(pixi_archive(standin_script("pixi 0.78.0")))

    with pytest.raises(
        PixiVerificationError, match=r"reports version 0\.78\.0.*pin is for 0\.79\.0"
    ):
        obtain_pixi(store, release.sources())

    final = binary_path(store, VERSION, release.target).parent
    assert not final.exists()
    assert not [p for p in final.parent.iterdir() if not p.name.endswith(".lock")]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("pixi", b"x", "file"), ("README", b"hi", "file")], "exactly one file"),
        ([("pixi", b"/bin/sh", "symlink")], "refusing the link"),
        ([("../pixi", b"x", "file")], "unsafe member path"),
        ([("/pixi", b"x", "file")], "unsafe member path"),
        ([("pixi", None, "dir")], "not a regular file"),
        ([("bin/pixi", b"x", "file")], "expected the file `pixi`"),
        ([], "exactly one file"),
    ],
)
def test_archives_holding_anything_but_the_single_file_pixi_are_refused(
    release, store, members, message
):
    release.publish(make_archive(members))
    with pytest.raises(PixiVerificationError, match=message):
        obtain_pixi(store, release.sources())
    assert not binary_path(store, VERSION, release.target).exists()


def test_dot_slash_member_name_is_accepted(release, store):
    release.publish(make_archive([("./pixi", standin_script(), "file")]))
    assert obtain_pixi(store, release.sources()).version == VERSION


def test_unknown_platform_is_a_config_error(release, store, monkeypatch):
    release.publish(pixi_archive())
    monkeypatch.setattr("platform.machine", lambda: "sparc64")
    with pytest.raises(ConfigError, match=r"no Pixi build is pinned for this platform .*sparc64"):
        obtain_pixi(store, release.sources())


def test_unpinned_version_names_the_pins_in_force(release, store):
    release.publish(pixi_archive())
    with pytest.raises(ConfigError, match=r"no Pixi pin for version 9\.9\.9 .*0\.79\.0"):
        obtain_pixi(store, release.sources(), version="9.9.9")


def test_a_damaged_unpacked_binary_is_replaced_from_the_store(release, store):
    script = standin_script()
    release.publish(pixi_archive(script))
    v = obtain_pixi(store, release.sources())
    v.path.chmod(0o755)
    v.path.write_bytes(b"#!/bin/sh\necho hacked\n")

    again = obtain_pixi(store, release.sources())

    assert again.path.read_bytes() == script
    assert release.server.count(f"/{release.rel}") == 1  # the archive came from the store


def copy_exe(src: Path, dest: Path, extra: bytes = b"") -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(src.read_bytes() + extra)
    dest.chmod(dest.stat().st_mode | stat.S_IXUSR)
    return dest


def test_pixi_on_path_is_used_only_when_its_digest_matches(release, store, tmp_path, monkeypatch):
    release.publish(pixi_archive())
    pinned = obtain_pixi(store, release.sources())

    good = copy_exe(pinned.path, tmp_path / "good" / "pixi")
    v = verify_pixi_executable(good, store=store)
    assert (v.path, v.sha256, v.source, v.version) == (good, pinned.sha256, "pin", VERSION)

    bad = copy_exe(pinned.path, tmp_path / "bad" / "pixi", extra=b"# changed\n")
    bad_sha = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(PixiVerificationError) as err:
        verify_pixi_executable(bad, store=store)
    assert bad_sha in str(err.value) and pinned.sha256 in str(err.value)
    assert (err.value.actual, err.value.expected) == (bad_sha, pinned.sha256)

    # found on PATH: a matching one is used; a mismatching one is skipped with a note
    monkeypatch.setenv("PATH", f"{good.parent}{os.pathsep}{os.environ['PATH']}")
    assert find_pixi_on_path() == good
    chosen, why = locate_pixi(store, release.sources())
    assert chosen is not None and chosen.path == good and "on PATH" in why
    monkeypatch.setenv("PATH", f"{bad.parent}{os.pathsep}{os.environ['PATH']}")
    chosen, why = locate_pixi(store, release.sources())
    assert chosen is not None and chosen.path == pinned.path
    assert f"the pixi on PATH ({bad}) was not used" in why
    # ...but one given explicitly (--pixi) must match
    with pytest.raises(PixiVerificationError):
        locate_pixi(store, release.sources(), pixi=bad)


def test_verify_fetches_the_pinned_archive_when_no_digest_is_known(release, store, tmp_path):
    script = standin_script()
    release.publish(pixi_archive(script))
    exe = tmp_path / "elsewhere" / "pixi"
    exe.parent.mkdir()
    exe.write_bytes(script)
    exe.chmod(0o755)

    with pytest.raises(PixiVerificationError, match="none known yet"):
        verify_pixi_executable(exe, store=store)
    v = verify_pixi_executable(exe, store=store, sources=release.sources())
    assert v.source == "pin" and v.path == exe


def test_a_removed_pin_revokes_the_binary(release, store, tmp_path):
    release.publish(pixi_archive())
    v = obtain_pixi(store, release.sources())
    release.publish(pixi_archive(standin_script(body="# another build")))  # new pin, same version
    with pytest.raises(PixiVerificationError):
        verify_pixi_executable(v.path, store=store)


def test_trust_pixi_accepts_an_unverified_binary_with_a_warning(tmp_path, caplog):
    exe = tmp_path / "pixi"
    exe.write_bytes(standin_script("pixi 0.80.1"))
    exe.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="pixicache.backends.pixi"):
        v = verify_pixi_executable(exe, trust=True)
    assert (v.source, v.version, v.archive_sha256) == ("trusted", "0.80.1", None)
    assert any(
        "UNVERIFIED" in r.getMessage() and str(exe) in r.getMessage() for r in caplog.records
    )
    chosen, why = locate_pixi(Store(tmp_path / "s"), trust_pixi=exe)
    assert chosen is not None and chosen.source == "trusted" and "--trust-pixi" in why


def test_cli_fetch_pins_and_verify(release, tmp_path, monkeypatch):
    archive_sha = release.publish(pixi_archive())
    monkeypatch.setenv("PIXICACHE_CACHE_DIR", str(tmp_path / "cli-store"))
    runner = CliRunner()

    res = runner.invoke(pixi_group, ["fetch", "--source", "upstream"])
    assert res.exit_code == 0, res.output
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path == binary_path(Store(tmp_path / "cli-store"), VERSION, release.target)

    res = runner.invoke(pixi_group, ["pins"])
    assert res.exit_code == 0
    assert archive_sha in res.output and "*" in res.output
    assert "PIXICACHE_PIXI_PINS" in runner.invoke(pixi_group, ["pins", "--help"]).output

    res = runner.invoke(pixi_group, ["verify", str(path), "--no-fetch"])
    assert res.exit_code == 0 and "matches the pinned archive" in res.output
    other = copy_exe(path, tmp_path / "x" / "pixi", extra=b"#\n")
    res = runner.invoke(pixi_group, ["verify", str(other), "--no-fetch"])
    assert res.exit_code == 4
    assert hashlib.sha256(other.read_bytes()).hexdigest() in res.output


def test_unpacking_is_atomic_for_concurrent_callers(release, store):
    from concurrent.futures import ThreadPoolExecutor

    release.publish(pixi_archive())
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: obtain_pixi(store, release.sources()), range(4)))
    assert len({r.path for r in results}) == 1
    assert release.server.count(f"/{release.rel}", method="GET") == 1
    leftovers = [p.name for p in results[0].path.parent.parent.iterdir()]
    assert leftovers == [release.target]
    shutil.rmtree(results[0].path.parent)
