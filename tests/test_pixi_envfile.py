"""Pixi's environment file (conda-meta/pixi): a Pixi run after pixicache installed sees it as current.

No Pixi binary can be run here, so a stand-in plays the part of ``pixi run``'s quick
check as Pixi's source (``LockedEnvironmentHash::from_environment``,
``cached_prefix``) does it: it reads ``conda-meta/pixi``, recomputes the hash with
the ``xxhash`` C library from the lock it parses itself, and says "up to date" only
when they are equal.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pixicache.backends.pixi.envfile import environment_file, locked_environment_hash
from pixicache.backends.pixi.xxh3 import xxh3_64
from pixicache.model.lockfile import Lock
from pixicache.model.manifest import Manifest

xxhash = pytest.importorskip("xxhash", reason="the C reference implementation (the test extra)")

REPO = Path(__file__).resolve().parent.parent

STANDIN_RUN = r'''
import json, struct, sys, tomllib, yaml, xxhash
from pathlib import Path

# `pixi run --manifest-path M -e ENV TASK`: the quick check of Pixi's lock_file/update.rs
argv = sys.argv[1:]
manifest = Path(argv[argv.index("--manifest-path") + 1])
env = argv[argv.index("-e") + 1]
prefix = manifest.parent / ".pixi" / "envs" / env
try:
    marker = json.loads((prefix / "conda-meta" / "pixi").read_text())
except (OSError, ValueError):
    print("no environment file: full update (would re-validate and reinstall)")
    sys.exit(10)
lock = yaml.safe_load((manifest.parent / "pixi.lock").read_text())
platform = "linux-64"
refs = lock["environments"][env]["packages"][platform]
entries = {(k, e[k]): e for e in lock["packages"] for k in ("conda", "pypi") if k in e}
conda, pypi = [], []
for ref in refs:
    kind = "conda" if "conda" in ref else "pypi"
    (conda if kind == "conda" else pypi).append(entries[(kind, ref[kind])])
s = lambda t: t.encode() + b"\xff"
b = lambda d: struct.pack("<Q", len(d)) + d
data = b""
for e in sorted(conda, key=lambda e: e["conda"].encode()):
    data += s(e["conda"])
    if e.get("sha256"):
        data += b(bytes.fromhex(e["sha256"]))
    elif e.get("md5"):
        data += b(bytes.fromhex(e["md5"]))
for e in sorted(pypi, key=lambda e: e["pypi"].encode()):
    data += s(e["pypi"])
sysreq = tomllib.loads(manifest.read_text()).get("system-requirements", {})
vps = {"__unix": "__unix=0=0", "__linux": "__linux=4.18", "__glibc": "__glibc=2.28",
       "__archspec": "__archspec=0=x86_64"}
if "cuda" in sysreq:
    vps["__cuda"] = "__cuda=" + str(sysreq["cuda"])
data += s(platform)
for vp in sorted(vps.values()):
    data += s(vp)
want = format(xxhash.xxh3_64_intdigest(data), "x")
if marker.get("environment_lock_file_hash") == want:
    print(f"Environment '{env}' is up-to-date with lock file hash {want}")
    sys.exit(0)
print(f"lock file hash {want} differs from {marker.get('environment_lock_file_hash')}: full update")
sys.exit(11)
'''


def test_xxh3_64_matches_the_reference_on_every_code_path():
    """Lengths 0-259 cover the 0-3, 4-8, 9-16, 17-128, 129-240 and long paths; the
    rest cross stripe and block (1024) boundaries."""
    for n in [*range(0, 260), 511, 512, 1023, 1024, 1025, 2048, 4096, 20011]:
        data = bytes((i * 131 + n) & 0xFF for i in range(n))
        assert xxh3_64(data) == xxhash.xxh3_64_intdigest(data), n


def _pixi_hash(lock: Lock, env: str, platform: str, vps: list[str]) -> str:
    """Pixi's algorithm, written out again with the C xxhash (see the module doc)."""
    pkgs = lock.packages(env, platform)
    data = b""
    for p in sorted((p for p in pkgs if p.kind == "conda"), key=lambda p: p.url.encode()):
        data += p.url.encode() + b"\xff"
        digest = bytes.fromhex(p.sha256) if p.sha256 else bytes.fromhex(p.md5 or "")
        data += struct.pack("<Q", len(digest)) + digest
    for p in sorted((p for p in pkgs if p.kind == "pypi"), key=lambda p: p.url.encode()):
        data += p.url.encode() + b"\xff"
    data += lock.platform_subdir(platform).encode() + b"\xff"
    for vp in sorted(vps):
        data += vp.encode() + b"\xff"
    return format(xxhash.xxh3_64_intdigest(data), "x")


def test_the_gpu_lock_hash_is_pixis():
    manifest = Manifest.load(REPO / "pixi.toml")
    lock = Lock.load(REPO / "pixi.lock")
    content = environment_file(manifest, lock, "default", "linux-64", "0.79.0")
    vps = content["resolved_platform"]["virtual_packages"]
    assert sorted(vps) == sorted(
        ["__cuda=12.9", "__unix=0=0", "__linux=4.18", "__glibc=2.28", "__archspec=0=x86_64"]
    )
    assert content["environment_lock_file_hash"] == _pixi_hash(lock, "default", "linux-64", vps)
    assert list(content) == [
        "manifest_path", "environment_name", "pixi_version", "environment_lock_file_hash",
        "resolved_platform", "minimum_supported_platform",
    ]  # fmt: skip
    assert content["minimum_supported_platform"] is None


def test_a_v7_lock_s_declared_virtual_packages_are_used():
    lock = Lock.load(REPO / "tests" / "data" / "locks" / "v7-custom-platforms.lock")
    content = environment_file(
        Manifest.parse("[workspace]\nname = 'x'\n", "/w/pixi.toml"), lock, "default",
        "linux-64-cuda12", "0.79.0",
    )  # fmt: skip
    assert content["resolved_platform"] == {"subdir": "linux-64", "virtual_packages": ["__cuda=12.6"]}
    assert content["environment_lock_file_hash"] == _pixi_hash(lock, "default", "linux-64-cuda12", ["__cuda=12.6"])


def test_md5_only_and_pypi_entries_hash_as_pixi_does(tmp_path):
    text = """\
version: 6
environments:
  default:
    channels: [{url: "https://conda.anaconda.org/robostack/"}]
    indexes: ["https://pypi.example.org/simple"]
    packages:
      linux-64:
      - conda: https://conda.anaconda.org/robostack/linux-64/ros-x-1.0-h0_0.tar.bz2
      - pypi: https://pypi-files.example.org/packages/aa/bb/demo-1.0-py3-none-any.whl
packages:
- conda: https://conda.anaconda.org/robostack/linux-64/ros-x-1.0-h0_0.tar.bz2
  md5: 0123456789abcdef0123456789abcdef
  size: 10
- pypi: https://pypi-files.example.org/packages/aa/bb/demo-1.0-py3-none-any.whl
  name: demo
  version: '1.0'
  sha256: 5aaa366385d716557e365f0a4e9c3fca43ba196872abbbe3d56bb610d131e192
"""
    lock = Lock.parse(text, str(tmp_path / "pixi.lock"))
    pkgs = lock.packages("default", "linux-64")
    vps = ["__unix=0=0"]
    assert locked_environment_hash(pkgs, "linux-64", vps) == _pixi_hash(lock, "default", "linux-64", vps)


@pytest.mark.slow
def test_a_pixi_run_after_pixicache_installed_does_not_reinstall(tmp_path, demo_lock, demo_upstream):
    """The agent installs with the rattler installer; the stand-in's `pixi run` check then
    finds the environment current (and one changed byte of the lock makes it stale)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "pixi.toml").write_text(
        "[workspace]\nname = 'w'\nchannels = ['conda-forge']\nplatforms = ['linux-64']\n"
        "[system-requirements]\ncuda = '12.0'\n[tasks]\nhello = 'hello'\n"
    )
    shutil.copy(demo_lock, ws / "pixi.lock")
    proc = subprocess.run(
        [sys.executable, "-m", "pixicache", "--cache-dir", str(tmp_path / "store"), "install",
         "--manifest", str(ws / "pixi.toml"), "--no-preflight", "--installer", "rattler",
         "--source", f"mirror={demo_upstream.url}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    written = json.loads((ws / ".pixi" / "envs" / "default" / "conda-meta" / "pixi").read_text())
    assert written["manifest_path"] == str(ws / "pixi.toml") and written["environment_name"] == "default"
    standin = tmp_path / "pixi-standin.py"
    standin.write_text(STANDIN_RUN)
    argv = [sys.executable, str(standin), "run", "--manifest-path", str(ws / "pixi.toml"), "-e", "default", "hello"]
    check = subprocess.run(argv, capture_output=True, text=True, env={**os.environ})
    assert check.returncode == 0, check.stdout + check.stderr
    assert "is up-to-date with lock file hash" in check.stdout
    lock_text = (ws / "pixi.lock").read_text()
    first_sha = yaml.safe_load(lock_text)["packages"][0]["sha256"]
    (ws / "pixi.lock").write_text(lock_text.replace(first_sha, first_sha[::-1]))
    stale = subprocess.run(argv, capture_output=True, text=True)
    assert stale.returncode == 11, stale.stdout  # the check is real: a changed lock is stale
