"""``pixicache install`` / ``pixicache run`` end to end, as a job would run them.

The real-package demo channel sits behind a local :class:`UpstreamServer`
playing conda-forge (the lock's URLs are https://conda.anaconda.org/conda-forge;
``--source mirror=<server>`` sends the agent there). Every command is a fresh
interpreter (``python -m pixicache``); installs use the ``rattler`` installer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pixicache.testing import UpstreamServer, current_subdir

PLATFORM = current_subdir()
pytestmark = pytest.mark.skipif(
    PLATFORM != "linux-64", reason="the demo channel is built for linux-64"
)

def _cli() -> list[str]:
    return [sys.executable, "-m", "pixicache"]


MANIFEST = """
[workspace]
name = "job"
channels = ["conda-forge"]
platforms = ["linux-64"]

[tasks]
hello = "hello"
greet = { cmd = "hello --from {{ who }}", args = [{ arg = "who", default = "pixicache" }] }
evict = { cmd = "trap 'echo TERM > term.txt; exit 42' TERM; echo ready > ready.txt; while true; do sleep 0.05; done" }
unsupported = { cmd = "true", clean-env = true }
"""


def _workspace(root: Path, lock: Path, manifest: str = MANIFEST) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(lock, root / "pixi.lock")
    (root / "pixi.toml").write_text(manifest)
    return root


def _agent(
    ws: Path,
    store: Path,
    *args: str,
    source: str | None,
    popen: bool = False,
    timeout: float = 120,
    extra_env: dict[str, str] | None = None,
):
    argv = [*_cli(), "--cache-dir", str(store), args[0]]
    if source is not None:
        argv += ["--source", source]
    argv += list(args[1:])
    env = dict(os.environ)
    env.pop("PIXICACHE_SOURCES", None)
    env.update(extra_env or {})
    if popen:
        return subprocess.Popen(
            argv, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)


def _report(ws: Path) -> dict:
    return json.loads((ws / "pixicache-report.json").read_text())


def _archive_gets(srv: UpstreamServer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in srv.requests:
        if r.method == "GET" and r.path.endswith((".conda", ".tar.bz2")):
            counts[r.path] = counts.get(r.path, 0) + 1
    return counts


def test_run_installs_with_rattler_and_runs_a_packaged_program(tmp_path, demo_lock, demo_upstream):
    ws = _workspace(tmp_path / "job", demo_lock)
    store = tmp_path / "node-store"
    gpus = {"CUDA_VISIBLE_DEVICES": "1", "_CONDOR_AssignedGPUs": "GPU-0a1b2c3d"}
    proc = _agent(
        ws,
        store,
        "run",
        "hello",
        "a",
        "b c",
        "--exit",
        "3",
        source=f"mirror={demo_upstream.url}",
        extra_env=gpus,
    )
    assert proc.returncode == 3, proc.stderr  # the task's exit code
    prefix = ws / ".pixi" / "envs" / "default"
    assert f"hello from {prefix}\n" in proc.stdout  # the placeholder was rewritten
    assert "arg: a\narg: b c\narg: --exit\narg: 3\n" in proc.stdout  # args passed, quoted
    assert "data: Hello from a real conda package!" in proc.stdout
    rep = _report(ws)
    assert rep["schema"] == "pixicache.report/1" and rep["exit_code"] == 3
    assert rep["gpus"] == gpus and rep["host"]["name"]
    assert (
        rep["installer"]["name"] == "rattler" and "no verified Pixi" in rep["installer"]["reason"]
    )
    assert rep["tiers"]["mirror"]["artifacts"] == 4 and rep["tiers"]["store"]["artifacts"] == 0
    assert rep["task"]["exit_code"] == 3 and rep["task"]["runner"] == "native"
    assert all(
        rep["phases"][p] is not None for p in ("plan", "preflight", "fetch", "install", "task")
    )
    assert "pixicache run: exit 3" in proc.stderr  # the human summary
    assert sorted(_archive_gets(demo_upstream).values()) == [1, 1, 1, 1]
    # task arguments declared in the manifest
    proc = _agent(ws, store, "run", "greet", "HTCondor", source=f"mirror={demo_upstream.url}")
    assert proc.returncode == 0 and "arg: --from\narg: HTCondor\n" in proc.stdout


def test_warm_node_fresh_workdir_makes_no_request(tmp_path, demo_lock, demo_upstream):
    store = tmp_path / "node-store"
    first = _workspace(tmp_path / "job1", demo_lock)
    assert _agent(first, store, "install", source=f"mirror={demo_upstream.url}").returncode == 0
    assert _report(first)["command"] == "install"
    demo_upstream.reset_log()
    from pixicache.store import Store

    index = Store(store)._db()
    index.execute("UPDATE blobs SET last_use=1000")  # long unused, as far as eviction knows
    second = _workspace(tmp_path / "job2", demo_lock)
    t0 = time.monotonic()
    proc = _agent(second, store, "run", "hello", source=f"mirror={demo_upstream.url}")
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert len(demo_upstream.requests) == 0  # zero network requests on a warm node
    rep = _report(second)
    assert rep["tiers"]["store"]["artifacts"] == 4
    assert sum(rep["tiers"][t]["artifacts"] for t in ("local", "mirror", "upstream")) == 0
    # the use was recorded (while the installer's child linked), for every artifact
    uses = [row[0] for row in index.execute("SELECT last_use FROM blobs")]
    assert len(uses) == 4 and all(u > time.time() - 600 for u in uses), uses
    print(
        f"\nwarm node, fresh workdir: time_to_task {rep['time_to_task']:.3f} s in the agent, "
        f"{wall:.3f} s wall including interpreter start; phases {rep['phases']}"
    )
    # and a third run in the same workdir: the prefix is current, nothing is fetched or linked
    proc = _agent(second, store, "run", "hello", source=f"mirror={demo_upstream.url}")
    assert proc.returncode == 0 and _report(second)["installer"]["changed"] is False
    print(f"same workdir again: time_to_task {_report(second)['time_to_task']:.3f} s")


def test_eight_concurrent_agents_on_a_cold_store_fetch_each_artifact_once(
    tmp_path, demo_lock, demo_upstream
):
    store = tmp_path / "node-store"
    procs = []
    for i in range(8):
        ws = _workspace(tmp_path / f"slot{i}", demo_lock)
        procs.append(
            (
                ws,
                _agent(
                    ws,
                    store,
                    "run",
                    "hello",
                    f"slot{i}",
                    source=f"mirror={demo_upstream.url}",
                    popen=True,
                ),
            )
        )
    for ws, proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert f"hello from {ws}/.pixi/envs/default\n" in out and f"arg: {ws.name}\n" in out
    gets = _archive_gets(demo_upstream)
    assert len(gets) == 4 and set(gets.values()) == {1}, gets  # each artifact fetched once per node
    tiers = [_report(ws)["tiers"] for ws, _ in procs]
    assert sum(t["mirror"]["artifacts"] for t in tiers) == 4
    assert sum(t["store"]["artifacts"] for t in tiers) == 8 * 4 - 4


def test_sigterm_to_the_agent_reaches_the_task_and_the_agent_exits_with_its_code(
    tmp_path, demo_lock, demo_upstream
):
    ws = _workspace(tmp_path / "job", demo_lock)
    proc = _agent(
        ws, tmp_path / "store", "run", "evict", source=f"mirror={demo_upstream.url}", popen=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (ws / "ready.txt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # HTCondor evicts the job: SIGTERM to the agent only
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 42, err
    assert (ws / "term.txt").read_text().strip() == "TERM"
    rep = _report(ws)
    assert rep["exit_code"] == 42 and rep["task"]["forwarded_signals"] == ["SIGTERM"]


def test_sigterm_before_the_task_stops_the_agent_cleanly_with_a_report(
    tmp_path, demo_lock, demo_upstream
):
    demo_upstream.fault("*.conda", "delay", seconds=20)
    ws = _workspace(tmp_path / "job", demo_lock)
    source = f"mirror={demo_upstream.url}"
    proc = _agent(ws, tmp_path / "store", "run", "-j", "1", "hello", source=source, popen=True)
    try:
        deadline = time.monotonic() + 60
        while not any(r.fault == "delay" for r in demo_upstream.requests):  # fetching now
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the agent never started fetching"
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert time.monotonic() - t0 < 10  # did not wait for the 20 s response
    rep = _report(ws)
    assert rep["error"]["type"] == "AgentInterrupted" and rep["task"] is None
    assert "stopped by SIGTERM" in err


def test_agent_failures_have_their_documented_exit_codes(tmp_path, demo_lock, demo_upstream):
    store = tmp_path / "store"
    source = f"mirror={demo_upstream.url}"
    # no lock beside the manifest: 2
    ws = _workspace(tmp_path / "nolock", demo_lock)
    (ws / "pixi.lock").unlink()
    proc = _agent(ws, store, "run", "hello", source=source)
    assert proc.returncode == 2 and "pixi lock" in proc.stderr
    assert _report(ws)["error"]["type"] == "LockError"
    # the lock lacks this platform: preflight says what to do, 8
    ws = _workspace(tmp_path / "platform", demo_lock)
    proc = _agent(ws, store, "install", "--platform", "win-64", source=source)
    assert proc.returncode == 8 and "pixi workspace platform add win-64" in proc.stderr
    # unknown task, unsupported feature: 6, before anything is installed
    ws = _workspace(tmp_path / "task", demo_lock)
    proc = _agent(ws, store, "run", "nope", source=source)
    assert proc.returncode == 6 and "no task 'nope'" in proc.stderr
    assert not (ws / ".pixi").exists()
    proc = _agent(ws, store, "run", "unsupported", source=source)
    assert proc.returncode == 6 and "clean-env" in proc.stderr
    # fetch failed (the mirror is down, nothing in the store): 3
    ws = _workspace(tmp_path / "fetch", demo_lock)
    proc = _agent(
        ws,
        tmp_path / "empty-store",
        "install",
        "--no-preflight",
        source="mirror=http://127.0.0.1:9",
    )
    assert proc.returncode == 3, proc.stderr
    assert "could not be fetched" in proc.stderr and _report(ws)["error"]["type"] == "FetchError"
    # wrong bytes from every source: integrity failure, 4
    demo_upstream.fault("*hello-1.0.0*", "wrong_bytes")
    proc = _agent(ws, tmp_path / "store4", "install", source=source)
    assert proc.returncode == 4, proc.stderr
    demo_upstream.clear_faults()
    # the prefix cannot be created: install failed, 5
    ws = _workspace(tmp_path / "install", demo_lock)
    (ws / ".pixi" / "envs").mkdir(parents=True)
    (ws / ".pixi" / "envs" / "default").write_text("not a directory")
    proc = _agent(ws, store, "install", source=source)
    assert proc.returncode == 5, proc.stderr
    assert _report(ws)["error"]["type"] == "InstallError"


def test_a_rotted_node_store_blob_is_quarantined_and_fetched_again(tmp_path, demo_lock, demo_upstream):
    import shutil

    from pixicache.model.lockfile import Lock
    from pixicache.store import Store

    store_dir = tmp_path / "node-store"
    first = _workspace(tmp_path / "job1", demo_lock)
    assert _agent(first, store_dir, "install", source=f"mirror={demo_upstream.url}").returncode == 0
    store = Store(store_dir)
    victim = max(Lock.load(demo_lock).artifacts(), key=lambda a: a.size or 0)
    blob = store.path_for(victim.sha256)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: a presence check cannot tell
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    shutil.rmtree(store_dir / "pkgs")  # no extracted copy to fall back on
    demo_upstream.reset_log()
    second = _workspace(tmp_path / "job2", demo_lock)
    proc = _agent(second, store_dir, "run", "hello", source=f"mirror={demo_upstream.url}")
    assert proc.returncode == 0, proc.stderr
    assert any("corrupt" in n and victim.sha256 in n for n in _report(second)["notes"])
    assert [r.path for r in demo_upstream.requests if r.path.endswith(victim.filename)]
    assert len(list(store.quarantine_dir.iterdir())) == 1


def test_a_blob_a_neighbour_quarantined_mid_install_is_fetched_again(
    tmp_path, demo_lock, demo_upstream, monkeypatch
):
    """Job A quarantines a rotted blob while job B installs: B's install sees the
    blob vanish; B fetches it again (once) and retries instead of failing."""
    import pixicache.installers.registry as auto
    from pixicache import agent
    from pixicache.config import resolve_settings
    from pixicache.model.lockfile import Lock
    from pixicache.store import Store

    store_dir = tmp_path / "node-store"
    source = f"mirror={demo_upstream.url}"
    first = _workspace(tmp_path / "job1", demo_lock)
    assert _agent(first, store_dir, "install", source=source).returncode == 0
    store = Store(store_dir)
    victim = max(Lock.load(demo_lock).artifacts(), key=lambda a: a.size or 0)
    shutil.rmtree(store_dir / "pkgs")  # no extracted copy to fall back on
    real_choose = auto.choose_installer
    calls: list[bool] = []

    class NeighbourQuarantines:
        """The real installer; before its first install a 'neighbour' moves the blob away."""

        def __init__(self, inner):
            self.inner, self.name = inner, inner.name

        def up_to_date(self, request):
            return self.inner.up_to_date(request)

        def install(self, request):
            if not calls:
                blob = store.path_for(victim.sha256)
                os.replace(blob, store.quarantine_dir / f"{victim.sha256}.neighbour")
            calls.append(True)
            return self.inner.install(request)

    def choose(request, name="auto"):
        inst, reason = real_choose(request, "rattler")
        return NeighbourQuarantines(inst), reason

    monkeypatch.setattr(auto, "choose_installer", choose)
    demo_upstream.reset_log()
    second = _workspace(tmp_path / "job2", demo_lock)
    settings = resolve_settings(cache_dir=store_dir, sources=[source])
    options = agent.AgentOptions(settings, preflight=False)
    outcome = agent.install(second / "pixi.toml", options=options)
    assert len(calls) == 2  # failed once, retried once
    assert outcome.prefix.is_dir() and store.has(victim.sha256, victim.size)
    fetched = [r.path for r in demo_upstream.requests if r.path.endswith(victim.filename)]
    assert len(fetched) == 1


def _in_process_install(tmp_path: Path, demo_lock: Path, source: str) -> tuple[Path, Any]:
    """A warm node (one install by a job before), and the options of a second one."""
    from pixicache import agent
    from pixicache.config import resolve_settings

    store_dir = tmp_path / "node-store"
    assert _agent(_workspace(tmp_path / "job1", demo_lock), store_dir, "install", source=source).returncode == 0
    settings = resolve_settings(cache_dir=store_dir, sources=[source])
    return _workspace(tmp_path / "job2", demo_lock), agent.AgentOptions(settings, preflight=False)


def test_in_a_bundle_the_collector_the_launcher_held_off_is_on_after_the_install(
    tmp_path, demo_lock, demo_upstream, monkeypatch
):
    """The bundle's launcher starts with cyclic garbage collection off (a start allocates
    much and frees little): it is on again once the install is done, what the start made
    frozen rather than collected in one deferred pass."""
    import gc
    from types import SimpleNamespace

    from pixicache import agent
    from pixicache.bundle import runtime

    ws, options = _in_process_install(tmp_path, demo_lock, f"mirror={demo_upstream.url}")
    bundle = SimpleNamespace(rattler_dir=None, rattler_ok=True, rattler_reason="as in a bundle")
    monkeypatch.setattr(runtime, "_RUNTIME", bundle)
    gc.disable()
    try:
        outcome = agent.install(ws / "pixi.toml", options=options)
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.enable()
        gc.unfreeze()
    assert (outcome.prefix / "bin" / "hello").is_file()
    monkeypatch.setattr(runtime, "_RUNTIME", None)  # outside a bundle: left as it is
    gc.disable()
    try:
        runtime.resume_collection()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_use_record_that_fails_never_cuts_the_install_short(
    tmp_path, demo_lock, demo_upstream, monkeypatch
):
    """The store's record of a warm job's use runs while the installer's child links;
    when it fails, the install still completes, and the error (exit 7) comes after it."""
    from pixicache import agent
    from pixicache.errors import StoreError
    from pixicache.store import Store

    ws, options = _in_process_install(tmp_path, demo_lock, f"mirror={demo_upstream.url}")
    calls: list[int] = []

    def broken(self: Store, artifacts: Any) -> None:
        calls.append(len(list(artifacts)))
        raise StoreError("the index is unusable (test)")

    monkeypatch.setattr(Store, "touch", broken)
    with pytest.raises(StoreError, match="unusable"):
        agent.install(ws / "pixi.toml", options=options)
    assert calls == [4]
    prefix = ws / ".pixi" / "envs" / "default"
    assert (prefix / "bin" / "hello").is_file() and (prefix / "conda-meta" / "pixi").is_file()


CHECK_AHEAD = r"""
a=$PPID; b=$(cut -d' ' -f4 /proc/$PPID/stat)
for p in /proc/[0-9]*; do
  ppid=$(cut -d' ' -f4 "$p/stat" 2>/dev/null) || continue
  [ "$ppid" = "$a" ] || [ "$ppid" = "$b" ] || continue
  if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q 'rattler.child import run'; then echo AHEAD-ALIVE; fi
done
echo checked
"""


def test_no_idle_py_rattler_child_sits_beside_the_task(tmp_path, demo_lock, demo_upstream):
    """run starts the py-rattler child ahead of the install; when the install does not
    need it (a no-op), it is ended before the task starts, not left for the job's life."""
    manifest = MANIFEST.replace("[tasks]\n", '[tasks]\ncheck = "sh ./check.sh"\n', 1)
    ws = _workspace(tmp_path / "job", demo_lock, manifest)
    (ws / "check.sh").write_text(CHECK_AHEAD)
    store = tmp_path / "node-store"
    for attempt in ("install", "no-op"):
        proc = _agent(ws, store, "run", "check", source=f"mirror={demo_upstream.url}")
        assert proc.returncode == 0, proc.stderr
        assert "checked" in proc.stdout and "AHEAD-ALIVE" not in proc.stdout, (attempt, proc.stdout)
    assert _report(ws)["installer"]["changed"] is False  # the second run was the no-op
