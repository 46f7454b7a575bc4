"""pixicache.testing builds REAL conda packages: py-rattler installs them and they work.

Every py-rattler call runs in a child process that ends with ``os._exit`` (see
rattler-notes: the interpreter can crash at exit after ``install``/``index_fs``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import rattler  # noqa: F401  (a test dependency: fail loudly if missing)
import zstandard

from pixicache.testing import (
    PLACEHOLDER,
    FileSpec,
    PackageSpec,
    UpstreamServer,
    build_channel,
    build_conda_package,
    build_demo_channel,
    current_subdir,
    demo_channel_specs,
    make_blob_workload,
    make_package_workload,
)
from pixicache.testing.channel import BINARY_BLOB, BINARY_SUFFIX

UPSTREAM = "https://conda.anaconda.org/conda-forge"

_PRELUDE = """
import asyncio, json, os, sys, traceback
def noarch(r):
    return "python" if r.noarch.python else "generic" if r.noarch.generic else None
def _main():
{body}
try:
    _main()
    rc = 0
except BaseException:
    traceback.print_exc()
    rc = 1
sys.stdout.flush(); sys.stderr.flush()
os._exit(rc)
"""


def run_rattler(body: str, timeout: float = 120) -> str:
    """Run ``body`` (py-rattler code) in a child; return its stdout; fail on error."""
    code = _PRELUDE.format(body=textwrap.indent(textwrap.dedent(body), "    "))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"rattler child failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def rattler_install(lock: Path, prefix: Path, cache: Path, mirror: str) -> list[dict]:
    """Install the lock's default environment through a mirror; return the records read."""
    out = run_rattler(
        f"""
        import rattler
        from rattler.networking import Client, MirrorMiddleware
        lock = rattler.LockFile.from_path({str(lock)!r})
        env = lock.default_environment()
        plat = next(p for p in env.platforms() if str(p) == {current_subdir()!r})
        records = env.conda_repodata_records_for_platform(plat)
        client = Client([MirrorMiddleware({{{UPSTREAM!r}: [{mirror!r}]}})])
        asyncio.run(rattler.install(records, target_prefix={str(prefix)!r},
                                    cache_dir={str(cache)!r}, client=client,
                                    show_progress=False))
        print(json.dumps([{{"url": r.url, "sha256": r.sha256.hex(), "name": r.name.normalized,
                           "noarch": noarch(r)}} for r in records]))
        """
    )
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The demo channel, served by a real upstream, installed by py-rattler."""
    base = tmp_path_factory.mktemp("demo-install")
    channel = build_demo_channel(base / "upstream")
    lock = channel.write_lock(base / "pixi.lock")
    prefix = base / "env with space"
    with UpstreamServer(channel.root) as srv:
        records = rattler_install(lock, prefix, base / "pkgs", srv.channel_url("conda-forge"))
        log = srv.requests
    return {"channel": channel, "prefix": prefix, "records": records, "log": log}


def test_hello_is_relocated_gets_args_and_propagates_exit_code(installed):
    prefix = installed["prefix"]
    proc = subprocess.run(
        [str(prefix / "bin" / "hello"), "a b", "c", "--exit", "7"], capture_output=True, text=True
    )
    assert proc.returncode == 7
    lines = proc.stdout.splitlines()
    assert lines[0] == f"hello from {prefix}"
    assert lines[1:5] == ["arg: a b", "arg: c", "arg: --exit", "arg: 7"]
    assert lines[-1] == "data: Hello from a real conda package!"
    env = dict(os.environ, HELLO_EXIT_CODE="3")
    assert subprocess.run([str(prefix / "bin" / "hello")], env=env).returncode == 3
    assert os.access(prefix / "bin" / "hello", os.X_OK)
    assert PLACEHOLDER not in (prefix / "bin" / "hello").read_text()


def test_binary_placeholder_is_rewritten_and_padded(installed):
    prefix = installed["prefix"]
    data = (prefix / "share" / "hello-data" / "prefix.bin").read_bytes()
    assert len(data) == len(BINARY_BLOB)
    assert PLACEHOLDER.encode() not in data
    start = BINARY_BLOB.index(PLACEHOLDER.encode())
    end = BINARY_BLOB.index(b"\0", start)
    expected = str(prefix).encode() + BINARY_SUFFIX
    assert data[:start] == BINARY_BLOB[:start]
    assert data[start : start + len(expected)] == expected
    assert data[start + len(expected) : end] == b"\0" * (end - start - len(expected))
    assert data[end:] == BINARY_BLOB[end:]


def test_noarch_python_package_links_with_entry_point(installed):
    prefix = installed["prefix"]
    v = sys.version_info
    assert (prefix / f"lib/python{v.major}.{v.minor}/site-packages/hello_py/__init__.py").is_file()
    proc = subprocess.run(
        [str(prefix / "bin" / "hello-py"), "x", "--exit", "4"], capture_output=True, text=True
    )
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout.splitlines() == [
        f"hello-py from {prefix}",
        "arg: x",
        "arg: --exit",
        "arg: 4",
    ]
    noarch = {r["name"]: r["noarch"] for r in installed["records"]}
    assert noarch["hello-py"] == "python"


def test_conda_meta_keeps_upstream_urls_including_tar_bz2(installed):
    prefix, channel = installed["prefix"], installed["channel"]
    metas = {p.name for p in (prefix / "conda-meta").glob("*.json")}
    assert metas == {f"{p.spec.dist_name}.json" for p in channel.packages}
    data = json.loads((prefix / "conda-meta" / "hello-data-1.0.0-h0_0.json").read_text())
    assert data["url"] == f"{UPSTREAM}/{current_subdir()}/hello-data-1.0.0-h0_0.tar.bz2"
    assert data["sha256"] == channel.package("hello-data").sha256
    rec = channel.records[f"{current_subdir()}/hello-data-1.0.0-h0_0.tar.bz2"]
    assert {k: data[k] for k in ("md5", "size", "depends")} == {
        k: rec[k] for k in ("md5", "size", "depends")
    }


def test_upstream_served_each_package_once_with_expected_digest(installed):
    channel, log = installed["channel"], installed["log"]
    for pkg in channel.packages:
        path = f"/conda-forge/{pkg.subdir}/{pkg.filename}"
        hits = [r for r in log if r.path == path]
        assert len(hits) == 1 and hits[0].status == 200 and hits[0].bytes_sent == pkg.size
        assert hits[0].headers.get("x-expected-sha256") == pkg.sha256


def test_builds_are_byte_identical(tmp_path):
    specs = demo_channel_specs()
    a = build_channel(tmp_path / "a", specs)
    b = build_channel(tmp_path / "b", specs)
    assert [p.sha256 for p in a.packages] == [p.sha256 for p in b.packages]
    assert (a.path / "noarch/repodata.json").read_bytes() == (
        b.path / "noarch/repodata.json"
    ).read_bytes()


def test_conda_and_tar_bz2_layout(tmp_path):
    spec = PackageSpec(
        "demo",
        "2.0",
        "h1_3",
        build_number=3,
        depends=["hello"],
        files={
            "bin/tool": FileSpec(f"#!/bin/sh\necho {PLACEHOLDER}\n", mode=0o755),
            "lib/blob": b"\0" + PLACEHOLDER.encode() + b"\0",
            "share/plain.txt": "plain\n",
        },
    )
    conda = build_conda_package(tmp_path, spec)
    with zipfile.ZipFile(conda.path) as zf:
        assert zf.namelist() == [
            "metadata.json",
            "pkg-demo-2.0-h1_3.tar.zst",
            "info-demo-2.0-h1_3.tar.zst",
        ]
        assert json.loads(zf.read("metadata.json")) == {"conda_pkg_format_version": 2}
        info = _tar_members(zf.read("info-demo-2.0-h1_3.tar.zst"))
        pkg = _tar_members(zf.read("pkg-demo-2.0-h1_3.tar.zst"))
    assert sorted(pkg) == ["bin/tool", "lib/blob", "share/plain.txt"]
    assert pkg["bin/tool"][1] == 0o755
    index = json.loads(info["info/index.json"][0])
    assert index["build_number"] == 3 and index["depends"] == ["hello"]
    assert index["subdir"] == current_subdir() == conda.record["subdir"]
    paths = {e["_path"]: e for e in json.loads(info["info/paths.json"][0])["paths"]}
    assert paths["bin/tool"]["file_mode"] == "text"
    assert paths["lib/blob"]["file_mode"] == "binary"
    assert paths["lib/blob"]["prefix_placeholder"] == PLACEHOLDER and len(PLACEHOLDER) == 255
    assert "file_mode" not in paths["share/plain.txt"]
    for path, entry in paths.items():
        assert entry["sha256"] == hashlib.sha256(pkg[path][0]).hexdigest()
        assert entry["size_in_bytes"] == len(pkg[path][0])
        assert entry["path_type"] == "hardlink"
    assert info["info/files"][0].decode().split() == sorted(paths)
    assert conda.sha256 == hashlib.sha256(conda.path.read_bytes()).hexdigest()

    bz2 = build_conda_package(tmp_path, spec, fmt="tar.bz2")
    with tarfile.open(bz2.path, "r:bz2") as tf:
        names = tf.getnames()
    assert names[0].startswith("info/") and names[-3:] == sorted(pkg)
    assert bz2.filename == "demo-2.0-h1_3.tar.bz2"


def test_noarch_python_metadata(tmp_path):
    hello_py = next(s for s in demo_channel_specs() if s.name == "hello-py")
    built = build_conda_package(tmp_path, hello_py)
    with zipfile.ZipFile(built.path) as zf:
        info = _tar_members(zf.read("info-hello-py-1.0.0-pyh0_0.tar.zst"))
    link = json.loads(info["info/link.json"][0])
    assert link["noarch"] == {"type": "python", "entry_points": ["hello-py = hello_py:main"]}
    index = json.loads(info["info/index.json"][0])
    assert index["noarch"] == "python" and index["subdir"] == "noarch" and "platform" not in index


def _tar_members(zst: bytes) -> dict[str, tuple[bytes, int]]:
    raw = zstandard.ZstdDecompressor().stream_reader(zst).read()
    import io

    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return {
            m.name: (tf.extractfile(m).read(), m.mode)  # type: ignore[union-attr]
            for m in tf.getmembers()
        }


def test_repodata_agrees_with_rattler_index(tmp_path):
    channel = build_demo_channel(tmp_path / "ours")
    theirs = tmp_path / "theirs" / "conda-forge"
    shutil.copytree(channel.path, theirs)
    for repodata in theirs.glob("*/repodata.json"):
        repodata.unlink()
    run_rattler(
        f"""
        from rattler.index import index_fs
        asyncio.run(index_fs({str(theirs)!r}, write_zst=False, write_shards=False, force=True))
        """
    )
    keys = ("name", "version", "build", "build_number", "depends", "subdir", "md5", "sha256")
    keys += ("size", "license", "timestamp", "noarch", "platform", "arch")
    for subdir in channel.subdirs:
        ours = json.loads((channel.path / subdir / "repodata.json").read_text())
        ref = json.loads((theirs / subdir / "repodata.json").read_text())
        assert ours["info"] == ref["info"] == {"subdir": subdir}
        assert ours["repodata_version"] == ref["repodata_version"] == 1
        for section in ("packages", "packages.conda"):
            assert sorted(ours[section]) == sorted(ref[section]), (subdir, section)
            for fn, rec in ours[section].items():
                want = {k: ref[section][fn].get(k) for k in keys}
                assert {k: rec.get(k) for k in keys} == want, fn
    assert json.loads((channel.path / "noarch/repodata.json").read_text())["packages.conda"]


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_channel_lock_reads_in_rattler(tmp_path, version):
    channel = build_demo_channel(tmp_path / "ch")
    lock = channel.write_lock(tmp_path / "pixi.lock", version=version)
    out = run_rattler(
        f"""
        import rattler
        env = rattler.LockFile.from_path({str(lock)!r}).default_environment()
        recs = [r for p in env.platforms() for r in env.conda_repodata_records_for_platform(p)]
        print(json.dumps(sorted([r.url, r.sha256.hex(), r.size, noarch(r)] for r in recs)))
        """
    )
    seen = json.loads(out.strip().splitlines()[-1])
    want = [[channel.url_of(p), p.sha256, p.size, p.record.get("noarch")] for p in channel.packages]
    assert seen == sorted(want)


def test_blob_workload_is_size_faithful_and_deterministic(tmp_path):
    a = make_blob_workload(tmp_path / "a", scale=0.001, seed=5)
    b = make_blob_workload(tmp_path / "b", scale=0.001, seed=5)
    c = make_blob_workload(tmp_path / "c", scale=0.001, seed=6)
    assert len(a.artifacts) == 121
    assert sum(x.original_size for x in a.artifacts) == 3_705_969_704
    assert [x.sha256 for x in a.artifacts] == [x.sha256 for x in b.artifacts]
    assert not {x.sha256 for x in a.artifacts} & {x.sha256 for x in c.artifacts}
    assert len({x.sha256 for x in a.artifacts}) == 121
    for art in a.artifacts:
        assert art.size == max(1, round(art.original_size * 0.001))
        assert art.path == a.root / art.url.split("://", 1)[1].split("/", 1)[1]
        assert hashlib.sha256(art.path.read_bytes()).hexdigest() == art.sha256
        assert art.url.startswith(UPSTREAM + "/")
    assert a.total_bytes == sum(x.path.stat().st_size for x in a.artifacts)
    out = run_rattler(
        f"""
        import rattler
        env = rattler.LockFile.from_path({str(a.lock_path)!r}).default_environment()
        plat = env.platforms()[0]
        recs = env.conda_repodata_records_for_platform(plat)
        print(json.dumps({{r.url: [r.sha256.hex(), r.size] for r in recs}}))
        """
    )
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {x.url: [x.sha256, x.size] for x in a.artifacts}


def test_package_workload_installs_with_rattler(tmp_path):
    work = make_package_workload(tmp_path / "up", scale=0.001, seed=2)
    assert len(work.artifacts) == 121
    assert work.total_bytes == sum(a.path.stat().st_size for a in work.artifacts)
    biggest = max(work.artifacts, key=lambda a: a.original_size)
    assert biggest.filename.startswith("libtorch-2.7.1-")
    assert biggest.size >= round(biggest.original_size * 0.001)
    prefix = tmp_path / "env"
    with UpstreamServer(work.root) as srv:
        rattler_install(work.lock_path, prefix, tmp_path / "pkgs", srv.channel_url("conda-forge"))
        assert srv.count("/conda-forge/*", method="GET") == 121
    assert len(list((prefix / "conda-meta").glob("*.json"))) == 121
    payload = prefix / "share/pixicache-workload" / (biggest.filename[: -len(".conda")] + ".bin")
    assert payload.stat().st_size == round(biggest.original_size * 0.001)
