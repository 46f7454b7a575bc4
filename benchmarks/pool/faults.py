"""The faults of ``--fault``: a mirror killed mid-fill, an eviction, a corrupt node-store blob..."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import CHANNEL, STAMP, _pixicache, _wait_for
from .jobs import JobRun, PhaseResult, Pool, PoolResult, _Scheduler


def _throttle_largest(pool: Pool, seconds: float) -> str:
    """Make the upstream stream the largest archive over ``seconds`` (once); its path."""
    sub, name, _, size = pool.wl.largest()
    path = f"/{CHANNEL}/{sub}/{name}"
    pool.upstream.fault(path, "slow", rate=max(1.0, size / seconds), times=1)
    return path


def _largest_in_flight(pool: Pool, store: Path) -> bool:
    """Whether the largest archive is half-way into ``store`` right now: its partial file
    (in the store's partial/ or, in a store shared by several users, one of theirs) holds
    some of its bytes but not all."""
    _sub, _name, sha, size = pool.wl.largest()
    for part in [store / "partial", *store.glob("user.*/partial")]:
        with contextlib.suppress(OSError):
            if 0 < (part / f"{sha}.part").stat().st_size < size:
                return True
    return False


def mirror_restart_controller(notes: list[str]) -> Callable[[Pool, _Scheduler, list[JobRun]], None]:
    """SIGKILL the site mirror while its fill of the (throttled) largest archive is
    half-way, with bytes on disk to resume from, then start it again at once."""

    def control(pool: Pool, sched: _Scheduler, runs: list[JobRun]) -> None:
        mirror = pool.mirror
        assert mirror is not None
        if not _wait_for(lambda: _largest_in_flight(pool, mirror.cache_dir), 300):
            notes.append("mirror-restart: no fill was seen in progress; the mirror was not killed")
            return
        down = mirror.restart()
        notes.append(f"mirror-restart: site mirror SIGKILLed mid-fill, back after {down:.2f} s")
        pool.log(f"  fault: site mirror killed mid-fill and restarted ({down:.2f} s down)")

    return control


def evict_controller(notes: list[str]) -> Callable[[Pool, _Scheduler, list[JobRun]], None]:
    """SIGTERM job 0 while its agent is fetching (as HTCondor does on eviction)."""

    def control(pool: Pool, sched: _Scheduler, runs: list[JobRun]) -> None:
        target: list[Any] = []

        def fetching() -> bool:
            with pool.running_lock:
                item = pool.running.get((0, 1))
            if item is None:
                return False
            proc, sb, _ = item
            out = (sb / "_condor_stdout").read_text(errors="replace") if sb.exists() else ""
            node = int(sb.parent.name[4:])
            # the throttled largest archive is half-way into the node store, and the job
            # (which needs it) has not reached its task yet
            if "bootstrap: running:" in out and _largest_in_flight(pool, pool.node_store(node)) and not (sb / STAMP).exists():
                target.append((proc, sb))
                return True
            return False

        if not _wait_for(fetching, 300):
            notes.append("evict: job 0 was never seen fetching; nothing was evicted")
            return
        proc = target[0][0]
        pool.evicted.add((0, 1))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # to bootstrap.sh, as the starter does
        notes.append("evict: job 0 got SIGTERM during its fetch; it is re-queued")
        pool.log("  fault: job 0 evicted (SIGTERM) mid-fetch; re-queued")

    return control


def corrupt_node_blob(pool: Pool, node: int = 0) -> dict[str, Any]:
    """Flip one byte in the middle of the largest ``.conda`` blob of ``node``'s store, and
    drop that package's extracted copy from the node's package cache (so an install
    needs the blob again). Returns what was done (for the checks)."""
    _sub, name, sha, size = pool.wl.largest()
    store = pool.node_store(node)
    blob = store / "sha256" / sha[:2] / sha
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as fh:
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(blob, 0o444)
    entry = name[: -len(".conda")]
    expected: dict[str, str] = {}
    # the package caches of the node: <store>/pkgs, or each user's in a shared store
    for pkgs in [store / "pkgs", *sorted(store.glob("user.*/pkgs"))]:
        extracted = pkgs / entry
        with contextlib.suppress(OSError, ValueError):
            paths = json.loads((extracted / "info" / "paths.json").read_text())["paths"]
            expected = {p["_path"]: p["sha256"] for p in paths if p.get("sha256")}
        shutil.rmtree(extracted, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (pkgs / ".pixicache-snapshots" / f"{entry}.json").unlink()
    return {"node": node, "sha256": sha, "filename": name, "entry": entry, "expected": expected}


def installed_files_intact(sb: Path, expected: dict[str, str]) -> bool | None:
    """Whether the job's prefix holds the package's files with their recorded digests
    (``None``: the package is not installed there)."""
    prefix = sb / ".pixi" / "envs" / "default"
    seen = False
    for rel, digest in expected.items():
        p = prefix / rel
        if not p.exists():
            continue
        seen = True
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != digest:
            return False
    return True if seen else None


def _recover_corrupt(pool: Pool, result: PoolResult, res: PhaseResult, c: dict[str, Any]) -> None:
    """After the corrupt-blob phase: ``pixicache cache verify`` on the node, one more job."""
    store = pool.node_store(c["node"])
    proc = _pixicache("cache", "verify", env={"PIXICACHE_CACHE_DIR": str(store)})
    quarantined = any(p.name.startswith(c["sha256"]) for p in (store / "quarantine").iterdir())
    res.notes.append(
        f"corrupt-node-blob: `pixicache cache verify` on node 0 exit {proc.returncode}, "
        f"blob quarantined: {quarantined}"
    )
    again = pool.run_phase("corrupt-recovery", 1, nodes=[c["node"]], slots=1)
    result.phases["corrupt-recovery"] = again
    pool.log(
        f"  recovery: cache verify quarantined the blob: {quarantined}; "
        f"a new job on node 0: exit {again.runs[0].rc}"
    )
