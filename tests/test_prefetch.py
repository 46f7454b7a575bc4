"""`pixicache plan` and `pixicache prefetch` end to end, through real local servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pixicache.model.lockfile import Lock
from pixicache.store import Store, hash_file

from .helpers import REPO, run_pixicache

GPU_LOCK = REPO / "pixi.lock"


def test_plan_of_the_shared_gpu_lock_reports_121_artifacts_and_their_bytes(tmp_path):
    res = run_pixicache("plan", str(GPU_LOCK), "--json", "--cache-dir", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["schema"] == "pixicache.plan/1"
    assert plan["count"] == 121 and len(plan["artifacts"]) == 121
    assert plan["bytes"] == 3_705_969_704
    assert plan["present_count"] == 0
    first = plan["artifacts"][0]
    assert {"url", "filename", "sha256", "size", "kind", "present"} <= set(first)
    text = run_pixicache("plan", str(GPU_LOCK), "--no-store")
    assert "121 artifacts, 3,705,969,704 bytes" in text.stdout


def test_prefetch_fills_the_store_once_and_a_second_run_transfers_nothing(blob_workload, workload_upstream, tmp_path):
    store_dir = tmp_path / "store"
    args = ("--cache-dir", str(store_dir), "prefetch", str(blob_workload.lock_path), "--source", f"mirror={workload_upstream.url}", "--progress", "log")
    res = run_pixicache(*args, "--json", str(tmp_path / "r1.json"))
    assert res.returncode == 0, res.stderr
    assert "all artifacts present and verified" in res.stderr
    report = json.loads((tmp_path / "r1.json").read_text())
    assert report["by_tier"]["mirror"]["artifacts"] == 121
    package_gets = [r for r in workload_upstream.requests if r.method == "GET" and r.path.endswith((".conda", ".tar.bz2"))]
    assert len(package_gets) == 121
    assert sum(r.bytes_sent for r in package_gets) == blob_workload.total_bytes
    store = Store(store_dir)
    for art in Lock.load(blob_workload.lock_path).artifacts(None, None):
        assert hash_file(store.path_for(art.sha256)) == art.sha256
    workload_upstream.reset_log()
    res = run_pixicache(*args, "--json", str(tmp_path / "r2.json"))
    assert res.returncode == 0, res.stderr
    assert workload_upstream.requests == []
    assert json.loads((tmp_path / "r2.json").read_text())["by_tier"]["store"]["artifacts"] == 121


def test_eight_concurrent_prefetches_download_each_artifact_once(blob_workload, workload_upstream, tmp_path):
    store_dir = tmp_path / "store"
    env = dict(os.environ, PIXICACHE_CACHE_DIR=str(store_dir), PIXICACHE_SOURCES=f"mirror={workload_upstream.url}")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pixicache", "prefetch", str(blob_workload.lock_path), "--progress", "none"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(8)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [o[1][-2000:] for o in outs]
    gets: dict[str, int] = {}
    for r in workload_upstream.requests:
        if r.method == "GET" and r.path.endswith((".conda", ".tar.bz2")):
            gets[r.path] = gets.get(r.path, 0) + 1
    assert len(gets) == 121 and set(gets.values()) == {1}


def test_wrong_bytes_from_the_mirror_use_the_next_source(blob_workload, workload_upstream, tmp_path, demo_channel):
    # The mirror corrupts one artifact; a local directory copy is the next source.
    victim = max(blob_workload.artifacts, key=lambda a: a.size)
    workload_upstream.fault(f"*/{victim.filename}", "wrong_bytes")
    res = run_pixicache(
        "--cache-dir", str(tmp_path / "store"), "prefetch", str(blob_workload.lock_path),
        "--source", f"mirror={workload_upstream.url}", "--source", f"dir={blob_workload.root}",
        "--progress", "none", "--json", str(tmp_path / "r.json"),
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["by_tier"]["local"]["artifacts"] == 1
    assert report["by_tier"]["mirror"]["artifacts"] == 120


def test_wrong_bytes_everywhere_fail_naming_the_artifact_and_both_digests(blob_workload, workload_upstream, tmp_path):
    victim = min(blob_workload.artifacts, key=lambda a: a.size)
    workload_upstream.fault(f"*/{victim.filename}", "wrong_bytes")
    res = run_pixicache(
        "--cache-dir", str(tmp_path / "store"), "prefetch", str(blob_workload.lock_path),
        "--source", f"mirror={workload_upstream.url}", "--progress", "none",
    )
    assert res.returncode == 4, res.stderr
    assert victim.filename in res.stderr and victim.sha256 in res.stderr
    assert "SHA-256 mismatch" in res.stderr and "Traceback" not in res.stderr
    store = Store(tmp_path / "store")
    assert not store.has(victim.sha256)
    assert not (store.partial_dir / f"{victim.sha256}.part").exists()


def test_kill_9_mid_download_leaves_no_blob_and_the_rerun_resumes_with_range(blob_workload, workload_upstream, tmp_path):
    big = max(blob_workload.artifacts, key=lambda a: a.size)
    workload_upstream.fault(f"*/{big.filename}", "slow", rate=max(big.size // 4, 1), times=1)
    store_dir = tmp_path / "store"
    store = Store(store_dir)
    partial = store.partial_dir / f"{big.sha256}.part"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixicache", "--cache-dir", str(store_dir), "prefetch", str(blob_workload.lock_path),
         "--source", f"mirror={workload_upstream.url}", "--progress", "none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (partial.exists() and partial.stat().st_size > big.size // 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and 0 < partial.stat().st_size < big.size
    assert not store.has(big.sha256)
    done_before = partial.stat().st_size
    workload_upstream.reset_log()
    res = run_pixicache("--cache-dir", str(store_dir), "prefetch", str(blob_workload.lock_path),
                        "--source", f"mirror={workload_upstream.url}", "--progress", "none")
    assert res.returncode == 0, res.stderr
    (rec,) = [r for r in workload_upstream.requests if r.path.endswith(big.filename)]
    assert rec.status == 206 and rec.range == f"bytes={done_before}-"
    assert rec.bytes_sent == big.size - done_before
    assert hash_file(store.path_for(big.sha256)) == big.sha256


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("version: 6\nenvironments: [\n", "line"),
        ("version: 99\nenvironments: {}\npackages: []\n", "99"),
        ("just a string\n", "pixi.lock"),
    ],
)
def test_a_malformed_lock_exits_2_naming_the_file_without_a_traceback(tmp_path, content, expected):
    lock = tmp_path / "pixi.lock"
    lock.write_text(content)
    res = run_pixicache("--cache-dir", str(tmp_path / "s"), "prefetch", str(lock))
    assert res.returncode == 2
    assert str(lock) in res.stderr and expected in res.stderr
    assert "Traceback" not in res.stderr


def test_an_unknown_environment_is_named(tmp_path):
    res = run_pixicache("plan", str(GPU_LOCK), "-e", "cuda-nope", "--no-store")
    assert res.returncode == 2 and "cuda-nope" in res.stderr and "default" in res.stderr


def test_the_real_lock_without_network_fails_naming_the_unreachable_host(tmp_path):
    # conda-forge cannot be reached from the test machine (no internet, or a proxy
    # that refuses): the failure must name the host, not print a traceback.
    env = {"HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}  # a closed port: fails at once either way
    res = run_pixicache("--cache-dir", str(tmp_path / "s"), "prefetch", str(GPU_LOCK), "--progress", "none", env=env)
    assert res.returncode == 3
    assert "conda.anaconda.org (through the proxy http://127.0.0.1:9) refused" in res.stderr
    assert "Traceback" not in res.stderr
    assert "MISSING: 121 artifact(s)" in res.stderr


def test_an_unresolvable_host_is_named(tmp_path, demo_channel):
    # .invalid never resolves (RFC 2606): the error must say so, once, and not retry.
    lock = demo_channel.write_lock(tmp_path / "pixi.lock", base_url="https://conda-forge.invalid/conda-forge")
    res = run_pixicache("--cache-dir", str(tmp_path / "s"), "prefetch", str(lock), "--progress", "none")
    assert res.returncode == 3
    assert "cannot resolve host conda-forge.invalid" in res.stderr
    assert "Traceback" not in res.stderr
