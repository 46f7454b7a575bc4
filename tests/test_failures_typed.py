"""Failures are types: a full store is exit 7 at any --jobs, worker exceptions reach the
caller, broken or clashing plugins are named, and a failed install re-verifies only
the blobs the installer reported bad."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest

from pixicache.errors import InstallError, PluginError, StoreFull
from pixicache.fetch import Fetcher
from pixicache.model.lockfile import Lock
from pixicache.plugins import PluginGroup, reset_cache
from pixicache.sources import parse_sources
from pixicache.sources.base import SourceFactory
from pixicache.store import Store

from .helpers import run_pixicache


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a small tmpfs at ``path``; the reason it could not be done, or ``None``."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "not root (or no mount(8)): a tmpfs of a fixed size cannot be mounted"
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return f"mount -t tmpfs failed: {proc.stderr.strip()}"
    return None


def test_prefetch_jobs_8_into_a_store_that_fills_exits_7(tmp_path, blob_workload, workload_upstream):
    """A real file system fills up mid-run (a 12 MiB tmpfs; the lock needs ~37 MB)."""
    store_dir = tmp_path / "small-fs"
    why = _mount_tmpfs(store_dir, "12m")
    if why is not None:
        pytest.skip(f"{why}; test_a_store_full_in_a_worker_thread_is_raised_as_store_full injects ENOSPC instead")
    try:
        proc = run_pixicache(
            "prefetch", str(blob_workload.lock_path), "--jobs", "8", "--cache-dir", str(store_dir),
            "--source", f"mirror={workload_upstream.url}", "--progress", "none",
        )
    finally:
        subprocess.run(["umount", "-l", str(store_dir)], check=False)
    assert proc.returncode == 7, proc.stderr
    assert "no space left in the store" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_store_full_in_a_worker_thread_is_raised_as_store_full(
    tmp_path, blob_workload, workload_upstream, monkeypatch
):
    """ENOSPC injected into the store's writes after ~5 MB, with 8 worker threads."""
    import pixicache.store.writer as writer_mod

    real_open = writer_mod.BlobWriter.write
    written = {"n": 0}

    def filling(self, data):
        written["n"] += len(data)
        if written["n"] > 5_000_000:
            raise self.store.os_error(OSError(errno.ENOSPC, "No space left on device"), "writing")
        return real_open(self, data)

    monkeypatch.setattr(writer_mod.BlobWriter, "write", filling)
    store = Store(tmp_path / "store")
    fetcher = Fetcher(store, parse_sources([f"mirror={workload_upstream.url}"]), jobs=8)
    with pytest.raises(StoreFull, match="no space left"):
        fetcher.fetch(Lock.load(blob_workload.lock_path).artifacts())


def test_an_unexpected_exception_in_a_worker_reaches_the_caller(tmp_path, blob_workload):
    class Exploding:
        tier, label = "mirror", "exploding"

        def location(self, artifact):
            return "somewhere"

        def fetch(self, artifact, writer, ctx):
            raise RuntimeError("a bug in a third-party source")

    store = Store(tmp_path / "store")
    with pytest.raises(RuntimeError, match="a bug in a third-party source"):
        Fetcher(store, [Exploding()], jobs=8).fetch(Lock.load(blob_workload.lock_path).artifacts())


# -- plugins -------------------------------------------------------------------------------


def _fake_distribution(root: Path, dist: str, group: str, name: str, module: str, code: str) -> None:
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}:Thing\n")
    (root / f"{module}.py").write_text(textwrap.dedent(code))


def test_a_plugin_that_raises_at_import_is_named_and_the_rest_works(tmp_path, demo_lock):
    site = tmp_path / "site"
    _fake_distribution(
        site, "broken-source", "pixicache.sources", "s3", "broken_source_mod",
        "raise ImportError('boto3 is not installed')\n",
    )
    env = {"PYTHONPATH": str(site)}
    listed = run_pixicache("plugins", env=env)
    assert listed.returncode == 9
    assert "s3" in listed.stdout and "BROKEN" in listed.stdout and "boto3 is not installed" in listed.stdout
    used = run_pixicache(
        "prefetch", str(demo_lock), "--source", "s3=bucket", "--cache-dir", str(tmp_path / "s"), env=env
    )
    assert used.returncode == 9, used.stderr
    assert "'s3'" in used.stderr and "broken-source 1.0" in used.stderr
    assert "boto3 is not installed" in used.stderr and "Traceback" not in used.stderr
    plan = run_pixicache("plan", str(demo_lock), "--no-store", env=env)
    assert plan.returncode == 0, plan.stderr
    channel = Lock.load(demo_lock).artifacts()[0].channel
    assert channel
    other = run_pixicache(
        "prefetch", str(demo_lock), "--source", "dir=/nonexistent", "--cache-dir",
        str(tmp_path / "s"), env=env,
    )
    assert other.returncode == 3, other.stderr  # the built-in source ran (and found nothing)
    assert "warning" in other.stderr and "s3" in other.stderr


def test_a_plugin_missing_a_protocol_member_is_broken_not_used(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_distribution(
        site, "half-source", "pixicache.sources", "half", "half_source_mod",
        "class Thing:\n    kind = 'half'\n",
    )
    monkeypatch.syspath_prepend(str(site))
    reset_cache()
    try:
        from pixicache.plugins import plugins

        found = plugins(PluginGroup("pixicache.sources", "source", SourceFactory))
        with pytest.raises(PluginError, match=r"SourceFactory protocol \(missing: claims, from_spec\)"):
            found.get("half")
        assert found.get("mirror") is not None
    finally:
        reset_cache()


def test_two_distributions_claiming_one_name_is_an_error_naming_both(tmp_path, monkeypatch):
    site = tmp_path / "site"
    tag = uuid.uuid4().hex[:6]
    group = f"pixicache.test-{tag}"
    code = "class Thing:\n    pass\n"
    _fake_distribution(site, f"first-{tag}", group, "dup", f"first_{tag}", code)
    _fake_distribution(site, f"second-{tag}", group, "dup", f"second_{tag}", code)
    monkeypatch.syspath_prepend(str(site))
    from pixicache.plugins import plugins

    class Nothing:
        pass

    with pytest.raises(PluginError) as err:
        plugins(PluginGroup(group, "test", Nothing))
    text = str(err.value)
    assert f"first-{tag} 1.0" in text and f"second-{tag} 1.0" in text and "'dup'" in text


def _importlib_entry_points(group: str) -> set[tuple[str, str, str]]:
    from importlib import metadata

    return {
        (ep.name, ep.value, f"{d.metadata['Name']} {d.version}")
        for d in metadata.distributions()
        for ep in d.entry_points
        if ep.group == group
    }


@pytest.mark.parametrize("group", ["pixicache.sources", "pixicache.installers", "console_scripts"])
def test_the_entry_point_reader_agrees_with_importlib_metadata(group, tmp_path, monkeypatch):
    """pixicache reads entry points itself (importlib.metadata costs ~35 ms per start):
    it must find what importlib.metadata finds, here and with a distribution whose
    entry_points.txt has comments, extras and other sections."""
    from pixicache.plugins import _entry_points

    site = tmp_path / "site"
    info = site / "odd_dist-2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: odd-dist\nVersion: 2.0\n\nName: not this\n")
    (info / "entry_points.txt").write_text(
        f"# a comment\n[other.group]\nx = a:b\n\n[{group}]\n# another comment\n"
        "  spaced   =   odd_mod:Thing.inner [extra]\nplain=odd_mod:Thing\n"
    )
    monkeypatch.syspath_prepend(str(site))
    ours = _entry_points(group)
    assert len(ours) == len(set(ours))
    assert {(n, t, d) for n, t, d in ours} == _importlib_entry_points(group)
    assert ("spaced", "odd_mod:Thing.inner [extra]", "odd-dist 2.0") in ours


def test_an_entry_point_target_loads_as_importlib_loads_it(tmp_path, monkeypatch):
    from importlib import metadata

    from pixicache.plugins import _load_target

    (tmp_path / "target_mod.py").write_text("class Thing:\n    class inner:\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for value in ("target_mod:Thing", "target_mod:Thing.inner", "target_mod:Thing [extra]", "target_mod"):
        expected = metadata.EntryPoint("x", value, "g").load()
        assert _load_target(value) is expected


# -- install repair ------------------------------------------------------------------------


def test_a_failed_install_reverifies_only_the_suspects(tmp_path, demo_lock, demo_upstream, monkeypatch):
    """The installer names one bad artifact: only that blob is re-hashed, not the environment."""
    from pixicache import agent
    from pixicache.config import resolve_settings
    from pixicache.installers import registry

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "pixi.toml").write_text("[workspace]\nname = 'x'\nchannels = ['conda-forge']\nplatforms = ['linux-64']\n")
    shutil.copy(demo_lock, ws / "pixi.lock")
    settings = resolve_settings(cache_dir=tmp_path / "store", sources=[f"mirror={demo_upstream.url}"])
    artifacts = Lock.load(demo_lock).artifacts()
    suspect = artifacts[0].sha256
    verified: list[list[str]] = []
    real_verify = Store.verify

    def spy(self, digests=None, **kw):
        verified.append(sorted(digests or []))
        return real_verify(self, digests, **kw)

    monkeypatch.setattr(Store, "verify", spy)

    class FailsNamingOne:
        name = "fails"

        def up_to_date(self, request):
            return False

        def install(self, request):
            raise InstallError("hash mismatch in one archive", suspects=[suspect])

    monkeypatch.setattr(registry, "choose_installer", lambda request, name="auto": (FailsNamingOne(), "test"))
    with pytest.raises(InstallError, match="hash mismatch"):
        agent.install(ws / "pixi.toml", options=agent.AgentOptions(settings, preflight=False))
    assert verified == [[suspect]]
    assert len(artifacts) > 1


def test_a_signal_while_a_plugin_imports_is_not_mistaken_for_a_broken_plugin(tmp_path, monkeypatch):
    """SIGTERM (eviction) raised in the middle of a plugin's import stops the agent."""
    from pixicache.agent.signals import AgentInterrupted

    site = tmp_path / "site"
    _fake_distribution(
        site, "slow-source", "pixicache.sources", "slow", "slow_source_mod",
        "import signal\nfrom pixicache.agent.signals import AgentInterrupted\n"
        "raise AgentInterrupted(signal.SIGTERM)\n",
    )
    monkeypatch.syspath_prepend(str(site))
    reset_cache()
    try:
        from pixicache.plugins import plugins

        with pytest.raises(AgentInterrupted):
            plugins(PluginGroup("pixicache.sources", "source", SourceFactory))
    finally:
        reset_cache()
