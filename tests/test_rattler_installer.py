"""The ``rattler`` installer with real packages: hand-off from the store, no-op, node sharing.

Every install runs py-rattler in its child process (``_rattler_child``); the
packages are the demo channel's (a text placeholder in ``bin/hello``, a binary
one in ``share/hello-data/prefix.bin``, a ``noarch: python`` package).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pixicache.errors import InstallError, UsageError
from pixicache.fetch import Fetcher
from pixicache.installers.base import Installer, InstallRequest
from pixicache.installers.rattler import RattlerInstaller, read_state
from pixicache.installers.registry import choose_installer, installer_plugins
from pixicache.model.lockfile import Lock
from pixicache.sources.local import LocalDirSource
from pixicache.store import Store
from pixicache.testing import PLACEHOLDER, build_channel, current_subdir, demo_channel_specs
from pixicache.testing.locks import LockPackage, write_lock

PLATFORM = current_subdir()

pytestmark = pytest.mark.skipif(
    PLATFORM != "linux-64", reason="the demo channel is built for linux-64"
)


def _fill(store: Store, channel_root: Path, lock: Lock) -> None:
    report = Fetcher(store, [LocalDirSource(channel_root)]).fetch(
        lock.artifacts("default", PLATFORM)
    )
    assert report.ok, report.missing


def _request(workspace: Path, lock_path: Path, store: Store) -> InstallRequest:
    workspace.mkdir(parents=True, exist_ok=True)
    if lock_path.parent != workspace:
        shutil.copy(lock_path, workspace / "pixi.lock")
    lock = Lock.load(workspace / "pixi.lock")
    return InstallRequest(
        workspace=workspace,
        manifest=workspace / "pixi.toml",
        lock=lock,
        environment="default",
        platform=PLATFORM,
        prefix=workspace / ".pixi" / "envs" / "default",
        store=store,
        package_cache=store.root / "pkgs",
    )


def _hello_data_101(root: Path) -> Any:
    """The demo channel with hello-data 1.0.1 (another greeting): one package changed."""
    specs = []
    for spec in demo_channel_specs():
        if spec.name == "hello-data":
            files = dict(spec.files)
            files["share/hello-data/greeting.txt"] = "Hello from version 1.0.1!\n"
            spec = dataclasses.replace(spec, version="1.0.1", files=files)
        specs.append(spec)
    return build_channel(root, specs)


@pytest.fixture
def store(tmp_path, demo_channel, demo_lock):
    s = Store(tmp_path / "store")
    _fill(s, demo_channel.root, Lock.load(demo_lock))
    return s


def test_install_from_the_store_keeps_lock_urls_and_rewrites_placeholders(
    tmp_path, store, demo_lock
):
    req = _request(tmp_path / "job", demo_lock, store)
    result = RattlerInstaller().install(req)
    assert result.changed and result.packages == 4
    assert "4 archive(s) from the store view" in result.notes[0]
    prefix = req.prefix
    hello = (prefix / "bin" / "hello").read_text()
    assert f'prefix="{prefix}"' in hello and PLACEHOLDER not in hello
    blob = (prefix / "share" / "hello-data" / "prefix.bin").read_bytes()
    assert PLACEHOLDER.encode() not in blob
    assert (str(prefix) + "/share/hello-data").encode() + b"\0" in blob
    record = json.loads((prefix / "conda-meta" / "hello-1.0.0-h0_0.json").read_text())
    assert (
        record["url"] == f"https://conda.anaconda.org/conda-forge/{PLATFORM}/hello-1.0.0-h0_0.conda"
    )
    state = read_state(prefix)
    assert state is not None and state["platform"] == PLATFORM and len(state["packages"]) == 4
    # every conda-meta/*.json is a package record (rattler refuses anything else there)
    assert sorted(p.name for p in (prefix / "conda-meta").glob("*.json")) == sorted(
        f"{d}.json" for d in state["packages"]
    )


def test_second_install_of_unchanged_lock_is_a_noop_in_milliseconds(
    tmp_path, store, demo_lock, monkeypatch
):
    req = _request(tmp_path / "job", demo_lock, store)
    RattlerInstaller().install(req)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a no-op install started a child process or a store view")

    # what makes it milliseconds: no py-rattler child, no store view, only stat calls
    monkeypatch.setattr("pixicache.backends.rattler.process.subprocess.Popen", forbidden)
    monkeypatch.setattr("pixicache.store.view.StoreView.start", forbidden)
    again = RattlerInstaller().install(req)
    monkeypatch.undo()
    print(f"no-op install: {again.seconds * 1000:.2f} ms")  # benchmarks/agent.py measures it
    assert again.changed is False
    assert "no-op" in again.notes[0]
    # an intact-prefix check: a missing package record makes it a real install again
    (req.prefix / "conda-meta" / "hello-1.0.0-h0_0.json").unlink()
    repaired = RattlerInstaller().install(req)
    assert repaired.changed is True
    assert (req.prefix / "conda-meta" / "hello-1.0.0-h0_0.json").is_file()


def test_changed_lock_updates_only_what_changed(tmp_path, store, demo_lock):
    req = _request(tmp_path / "job", demo_lock, store)
    RattlerInstaller().install(req)
    hello = req.prefix / "bin" / "hello"
    before = os.stat(hello)
    # the same channel with hello-data 1.0.1 (other greeting): only that package changes
    v2 = _hello_data_101(tmp_path / "v2")
    v2_lock = v2.write_lock(tmp_path / "v2.lock")
    shutil.copy(v2_lock, req.workspace / "pixi.lock")
    req2 = _request(req.workspace, req.workspace / "pixi.lock", store)
    _fill(store, v2.root, req2.lock)
    result = RattlerInstaller().install(req2)
    assert result.changed
    assert (
        req.prefix / "share" / "hello-data" / "greeting.txt"
    ).read_text() == "Hello from version 1.0.1!\n"
    meta = {p.name for p in (req.prefix / "conda-meta").glob("*.json")}
    assert "hello-data-1.0.1-h0_0.json" in meta and "hello-data-1.0.0-h0_0.json" not in meta
    after = os.stat(hello)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not relinked
    assert "1 archive(s) from the store view" in result.notes[0]


def test_a_job_writing_into_its_prefix_does_not_change_what_later_jobs_get(
    tmp_path, store, demo_lock
):
    job1 = _request(tmp_path / "job1", demo_lock, store)
    RattlerInstaller().install(job1)
    greeting = job1.prefix / "share" / "hello-data" / "greeting.txt"
    pristine = greeting.read_text()
    assert os.stat(greeting).st_nlink > 1  # a hard link into the node's package cache
    with open(greeting, "a") as fh:  # job 1 modifies a file of its prefix in place
        fh.write("job 1 was here\n")
    site = job1.prefix / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    (site / "pip_installed.py").write_text("x = 1\n")  # and pip-installs something

    job2 = _request(tmp_path / "job2", demo_lock, store)
    result = RattlerInstaller().install(job2)
    assert (job2.prefix / "share" / "hello-data" / "greeting.txt").read_text() == pristine
    assert not list(job2.prefix.rglob("pip_installed.py"))
    assert any("hello-data-1.0.0-h0_0" in n for n in result.notes), result.notes
    assert greeting.read_text() == pristine + "job 1 was here\n"  # job 1 keeps its own change

    # a same-size, in-place edit (no append) through job 2's hard link is caught too
    with open(job2.prefix / "share" / "hello-data" / "greeting.txt", "r+b") as fh:
        fh.write(b"J")
    job3 = _request(tmp_path / "job3", demo_lock, store)
    RattlerInstaller().install(job3)
    assert (job3.prefix / "share" / "hello-data" / "greeting.txt").read_text() == pristine


def test_install_error_names_what_the_store_could_not_serve(tmp_path, store, demo_lock):
    req = _request(tmp_path / "job", demo_lock, store)
    art = next(
        a for a in req.lock.artifacts("default", PLATFORM) if a.filename.startswith("hello-1")
    )
    assert store.remove(art.sha256)
    with pytest.raises(InstallError) as info:
        RattlerInstaller().install(req)
    assert "hello-1.0.0-h0_0.conda" in str(info.value) and "not in the store" in str(info.value)
    assert read_state(req.prefix) is None


def test_pypi_entries_need_their_wheel_in_the_store_and_a_python_of_the_prefix(
    tmp_path, store, demo_channel
):
    """The rattler installer takes PyPI entries (pypa/installer), but installs nothing
    from outside the store, and never into an interpreter that is not the prefix's own
    (the demo channel's ``python`` is a shim running the host's: its site-packages is
    the host's)."""
    pkgs = demo_channel.lock_packages(platform=PLATFORM)
    wheel = LockPackage(
        "pypi",
        "https://pypi-files.example.org/packages/ab/cd/six-1.16.0-py2.py3-none-any.whl",
        "ab" * 32,
        "six",
        "1.16.0",
    )
    lock_path = write_lock(tmp_path / "ws" / "pixi.lock", {"default": {PLATFORM: [*pkgs, wheel]}})
    req = _request(tmp_path / "ws", lock_path, store)
    ok, why = RattlerInstaller.available(req)
    assert ok and "1 PyPI package(s) with pypa/installer" in why
    with pytest.raises(InstallError, match="outside the environment"):
        RattlerInstaller().install(req)
    assert read_state(req.prefix) is None  # no marker: the next run tries again

def test_choose_installer_auto_rattler_pixi_and_unknown(tmp_path, store, demo_lock):
    assert {"rattler", "pixi"} <= set(installer_plugins())
    req = _request(tmp_path / "ws", demo_lock, store)
    inst, why = choose_installer(req)
    assert isinstance(inst, RattlerInstaller) and isinstance(inst, Installer)
    assert why.startswith("rattler (auto)") and "no verified Pixi" in why
    fake = tmp_path / "pixi"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    inst, why = choose_installer(dataclasses.replace(req, pixi=fake), "auto")
    assert inst.name == "pixi" and why.startswith("pixi (auto)")
    inst, why = choose_installer(dataclasses.replace(req, pixi=fake), "rattler")
    assert inst.name == "rattler" and "as asked" in why
    with pytest.raises(InstallError, match="no verified Pixi"):
        choose_installer(req, "pixi")
    with pytest.raises(UsageError, match="unknown installer 'conda'"):
        choose_installer(req, "conda")


def test_conda_source_packages_are_refused_by_name(tmp_path, store, demo_channel):
    pkgs = demo_channel.lock_packages(platform=PLATFORM)
    source = LockPackage("conda", ".", None, "my-project", "0.1.0", build="pyh0_0", subdir="noarch")
    lock_path = write_lock(tmp_path / "ws" / "pixi.lock", {"default": {PLATFORM: [*pkgs, source]}})
    req = _request(tmp_path / "ws", lock_path, store)
    with pytest.raises(InstallError, match=r"conda source package\(s\) that must be built: my-project \(\.\)"):
        RattlerInstaller().install(req)
    assert not (req.prefix / "conda-meta").exists()  # refused before anything was linked


# -- the child started ahead of need (pixicache.agent.ahead) -------------------------------


def test_a_child_started_ahead_installs_from_the_lock_it_read_ahead(tmp_path, store, demo_lock):
    from pixicache.backends.rattler.process import start_ahead

    req = _request(tmp_path / "job", demo_lock, store)
    assert start_ahead(req.workspace / "pixi.lock")
    result = RattlerInstaller().install(req)
    assert "py-rattler child started ahead of need (the lock read ahead)" in result.notes
    state = read_state(req.prefix)
    assert state is not None and len(state["packages"]) == 4
    assert f'prefix="{req.prefix}"' in (req.prefix / "bin" / "hello").read_text()


def test_a_lock_replaced_after_the_read_ahead_is_read_again(tmp_path, store, demo_lock):
    """The child parsed pixi.lock before the agent looked at it; the file changed in
    between: the child installs what the file says now, never what it read ahead."""
    import time

    from pixicache.backends.rattler.process import start_ahead

    workspace = tmp_path / "job"
    workspace.mkdir()
    shutil.copy(demo_lock, workspace / "pixi.lock")
    assert start_ahead(workspace / "pixi.lock")
    time.sleep(3)  # the child has imported py-rattler and read the lock by now
    v2 = _hello_data_101(tmp_path / "v2")
    shutil.copy(v2.write_lock(tmp_path / "v2.lock"), workspace / "pixi.lock")
    req = _request(workspace, workspace / "pixi.lock", store)
    _fill(store, v2.root, req.lock)
    result = RattlerInstaller().install(req)
    assert "py-rattler child started ahead of need" in result.notes
    greeting = req.prefix / "share" / "hello-data" / "greeting.txt"
    assert greeting.read_text() == "Hello from version 1.0.1!\n"


def test_a_child_started_ahead_and_never_used_ends_with_the_agent(tmp_path):
    import subprocess
    import sys
    import time

    code = (
        "from pixicache.backends.rattler import process\n"
        "assert process.start_ahead()\n"
        "print(process._AHEAD[0][0].pid, flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split()[2] == "Z":
                    break  # exited (a zombie of init until reaped)
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the unused py-rattler child {pid} is still running")


def test_a_warm_package_cache_installs_without_a_store_view(tmp_path, store, demo_lock, monkeypatch):
    """Every package already extracted on the node: the second prefix needs no archive,
    so no store view is started (its HTTP server is ~40 ms of a warm job)."""
    RattlerInstaller().install(_request(tmp_path / "job1", demo_lock, store))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a store view was started for a warm package cache")

    monkeypatch.setattr("pixicache.store.view.StoreView.start", forbidden)
    job2 = _request(tmp_path / "job2", demo_lock, store)
    result = RattlerInstaller().install(job2)
    assert result.changed and "no store view" in result.notes[0], result.notes
    assert (job2.prefix / "bin" / "hello").is_file()


def _install_then_change_a_cache_entry(tmp_path: Path, store: Store, demo_lock: Path) -> str:
    """Install once (the package cache fills), then change a file of hello-data's cache
    entry in place, as a job writing through its prefix's hard link would; returns the
    file's pristine text."""
    RattlerInstaller().install(_request(tmp_path / "job1", demo_lock, store))
    cached = store.package_cache / "hello-data-1.0.0-h0_0" / "share" / "hello-data" / "greeting.txt"
    pristine = cached.read_text()
    with open(cached, "a") as fh:
        fh.write("changed in the cache\n")
    return pristine


def test_a_cache_entry_the_guard_repairs_is_fetched_through_the_view(tmp_path, store, demo_lock):
    """A cache entry changed since extraction: the child's guard evicts it and asks for
    the store view before rattler runs; the entry comes back from the node store."""
    pristine = _install_then_change_a_cache_entry(tmp_path, store, demo_lock)
    job2 = _request(tmp_path / "job2", demo_lock, store)
    result = RattlerInstaller().install(job2)
    assert "1 archive(s) from the store view" in result.notes[0], result.notes
    assert not any("alone failed" in n for n in result.notes), result.notes  # asked, not failed
    assert any("repaired package-cache entries" in n and "hello-data" in n for n in result.notes)
    assert (job2.prefix / "share" / "hello-data" / "greeting.txt").read_text() == pristine


def test_the_cache_guard_checks_ahead_and_the_install_uses_that_check(tmp_path, store, demo_lock):
    """Once the plan is made the agent sends the waiting child ``prepare``: its cache
    guard checks the entries then, while the agent goes on. A changed entry is repaired
    by that check; the install does not check again, and the prefix is pristine."""
    import time

    from pixicache.agent.ahead import prepare_installer_ahead
    from pixicache.backends.rattler.process import start_ahead

    pristine = _install_then_change_a_cache_entry(tmp_path, store, demo_lock)
    job2 = _request(tmp_path / "job2", demo_lock, store)
    assert start_ahead(job2.workspace / "pixi.lock")
    assert prepare_installer_ahead(job2.workspace / "pixi.lock", "default", PLATFORM, job2.package_cache)
    time.sleep(3)  # the child has imported py-rattler and run the check by now
    result = RattlerInstaller().install(job2)
    assert any("guard_ahead" in n for n in result.notes), result.notes
    assert any("repaired package-cache entries" in n and "hello-data" in n for n in result.notes)
    assert (job2.prefix / "share" / "hello-data" / "greeting.txt").read_text() == pristine


def test_a_check_ahead_for_another_cache_is_not_used(tmp_path, store, demo_lock):
    from pixicache.agent.ahead import prepare_installer_ahead
    from pixicache.backends.rattler.process import start_ahead

    RattlerInstaller().install(_request(tmp_path / "job1", demo_lock, store))
    job2 = _request(tmp_path / "job2", demo_lock, store)
    assert start_ahead(job2.workspace / "pixi.lock")
    assert prepare_installer_ahead(job2.workspace / "pixi.lock", "default", PLATFORM, tmp_path / "other")
    result = RattlerInstaller().install(job2)
    assert not any("guard_ahead" in n for n in result.notes), result.notes
    assert any("guard_before" in n for n in result.notes) and (job2.prefix / "bin" / "hello").is_file()


def test_a_cache_entry_rattler_cannot_use_is_fetched_through_the_view(tmp_path, store, demo_lock):
    """An entry rattler itself finds broken (without the guard): it wants the archive,
    finds the channels mapped to a port that refuses, and the install is made again
    through the view: nothing is fetched from anywhere else."""
    RattlerInstaller(guard=False).install(_request(tmp_path / "job1", demo_lock, store))
    entry = store.package_cache / "hello-data-1.0.0-h0_0"
    (entry / "info" / "paths.json").unlink()
    (entry / "info" / "index.json").unlink()
    job2 = _request(tmp_path / "job2", demo_lock, store)
    result = RattlerInstaller(guard=False).install(job2)
    assert "archive(s) from the store view" in result.notes[0], result.notes
    assert any("from the package cache alone failed" in n for n in result.notes), result.notes
    greeting = job2.prefix / "share" / "hello-data" / "greeting.txt"
    assert greeting.read_text().startswith("Hello")


def test_the_childs_operation_count_reads_conda_meta_as_rattler_counts(tmp_path):
    """The child counts a transaction's operations from ``conda-meta`` (a reporter's
    per-package callbacks cost ~10 ms): installed, removed and changed packages are
    one each, a package left alone is none; names may hold dashes."""
    import os

    from pixicache.backends.rattler.child import _linked, operations_between

    meta = tmp_path / "conda-meta"
    meta.mkdir()
    assert _linked(str(tmp_path / "missing")) == {}

    def put(name: str) -> None:
        (meta / name).write_text("{}")

    before = _linked(str(tmp_path))
    for name in ("python-3.12.0-h0_0.json", "python-dateutil-2.9.0-pyhd8_0.json", "zlib-1.3-h1_0.json"):
        put(name)
    (meta / "pixicache-state").write_text("")  # not a record
    fresh = _linked(str(tmp_path))
    assert sorted(fresh) == ["python", "python-dateutil", "zlib"]
    assert operations_between(before, fresh) == 3
    assert operations_between(fresh, _linked(str(tmp_path))) == 0
    (meta / "zlib-1.3-h1_0.json").unlink()
    put("zlib-1.3.1-h1_0.json")  # changed: one operation
    (meta / "python-dateutil-2.9.0-pyhd8_0.json").unlink()  # removed: one
    put("numpy-2.0-py312_0.json")  # installed: one
    st = (meta / "python-3.12.0-h0_0.json").stat()
    os.utime(meta / "python-3.12.0-h0_0.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten: one
    assert operations_between(fresh, _linked(str(tmp_path))) == 4


def test_the_child_imports_asyncio_without_ssl_and_ssl_stays_importable():
    """The child imports asyncio with ``ssl`` unavailable (its TLS support is never used
    there: ~7 ms), and a py-rattler that imports ``ssl`` itself still gets it."""
    import subprocess
    import sys

    from pixicache.backends.rattler.process import PREWARM

    root = str(Path(__file__).resolve().parent.parent)
    code = (
        "import sys; sys.path.append(sys.argv[1])\n"
        "from pixicache.backends.rattler.child import import_asyncio_without_ssl\n"
        "import_asyncio_without_ssl()\n"
        "import asyncio.base_events as b; assert b.ssl is None, b.ssl\n"
        "import ssl; assert ssl.HAS_SNI is not None\n"
        "print('ok')\n"
    )
    for program, args in ((code, [root]), (PREWARM + "import ssl\nprint('ok')\n", [])):
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", program, *args],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_childs_own_sha256_is_hashlibs_and_its_start_loads_no_openssl():
    """The child fingerprints a prefix with CPython's own SHA-256 module (same digest as
    hashlib's) so its start does not load OpenSSL for it."""
    import hashlib
    import subprocess
    import sys

    from pixicache.backends.rattler.child import _sha256

    for data in (b"", b"abc", os.urandom(100_000)):
        assert _sha256(data) == hashlib.sha256(data).hexdigest()
    tree = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {tree!r}); "
        "import pixicache.backends.rattler.child as c; c.prefix_fingerprint('.'); "
        "print(sorted(m for m in ('hashlib', '_hashlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
