"""Running the phases of a pool and checking what the pool must show (:func:`run_pool`)."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from pixicache.testing.condor import traversable

from .common import FAULTS, PHASES, SINGLE_RUNS, _human, worker_python
from .faults import (
    _recover_corrupt,
    _throttle_largest,
    corrupt_node_blob,
    evict_controller,
    installed_files_intact,
    mirror_restart_controller,
)
from .jobs import JobRun, Pool, PoolConfig, PoolResult
from .workload import PreparedWorkload, prepare_workload


def run_pool(cfg: PoolConfig, *, workload: PreparedWorkload | None = None) -> PoolResult:
    """Build the pool, run the phases (with the faults), return the measurements.

    ``cfg.bundle``: a built ``pixicache.pyz`` to use (else one is built, offline,
    from this interpreter's packages). ``workload``: a prepared workload to reuse.
    """
    for f in cfg.faults:
        if f not in FAULTS:
            raise ValueError(f"unknown fault {f!r}; choose from {', '.join(FAULTS)}")
    for p in cfg.phases:
        if p not in PHASES:
            raise ValueError(f"unknown phase {p!r}; choose from {', '.join(PHASES)}")
    if "corrupt-node-blob" in cfg.faults and not {"warm-nodes"} <= set(cfg.phases):
        raise ValueError("the corrupt-node-blob fault acts before the warm-nodes phase")
    owned = cfg.workdir is None
    work = Path(tempfile.mkdtemp(prefix="pixicache-pool-")) if owned else Path(cfg.workdir)  # type: ignore[arg-type]
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = print if cfg.verbose else (lambda *a, **k: None)
    try:
        t = time.monotonic()
        pypi_python = worker_python(cfg.worker_python)[0] if cfg.pypi else None
        wl = workload or prepare_workload(
            work / "upstream", cfg.scale, cfg.seed, pypi_python=pypi_python
        )
        if cfg.pypi and not wl.pypi:
            raise ValueError("--pypi needs a workload prepared with pypi_python")
        log(
            f"workload: {len(wl.packages)} conda packages"
            + (f" + {len(wl.pypi)} wheels ({_human(wl.pypi_bytes)})" if wl.pypi else "")
            + f", {_human(wl.env_bytes)} (scale {cfg.scale}) "
            f"ready in {time.monotonic() - t:.1f} s"
        )
        bundle = _bundle(cfg, work)
        log(f"agent: {bundle.path} ({_human(bundle.size)}, sha256 {bundle.sha256[:16]}...)")
        pool = Pool(cfg, work, wl, bundle)
        result = PoolResult(cfg, wl.env_bytes, wl.count, {}, bundle_sha256=bundle.sha256)
        reach = traversable(work, Path(pool.python)) if pool.users > 1 else contextlib.nullcontext()
        try:
            with reach:  # the job users must reach their sandboxes and the interpreter
                _run_phases(pool, result)
        finally:
            pool.close()
        if pool.disk_full_mounted is not None:
            result.mirror_disk = "tmpfs" if pool.disk_full_mounted else "max-size"
            result.notes.append(
                "mirror-disk-full: the site mirror's store was "
                + (
                    "a tmpfs with room for 40% of the environment (real ENOSPC)"
                    if pool.disk_full_mounted
                    else "limited by --max-size to 40% of the environment (LRU eviction)"
                )
            )
        return result
    finally:
        if owned and not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)


def _bundle(cfg: PoolConfig, work: Path) -> Any:
    from pixicache.bundle.build import BundleInfo, build_bundle

    if cfg.bundle is not None:
        path = Path(cfg.bundle)
        h = hashlib.sha256(path.read_bytes()).hexdigest()
        return BundleInfo(path=path, sha256=h, size=path.stat().st_size)
    if cfg.worker_python is not None:
        # the pinned wheels (Python >= 3.9) and both py-rattler builds, as `pixicache bundle`
        house = cfg.wheelhouse or Path.home() / ".cache" / "pixicache-test-wheels"
        return build_bundle(work / "pixicache.pyz", source="pypi", wheelhouse=house, compresslevel=1)
    return build_bundle(work / "pixicache.pyz", source="installed", compresslevel=1)


def _run_phases(pool: Pool, result: PoolResult) -> None:
    cfg = pool.cfg
    faults = set(cfg.faults)
    n = pool.wl.count
    evicted = pool.evicted

    def mark_evicted(run: JobRun, sb: Path) -> None:
        if (run.job, run.attempt) in evicted:
            run.evicted = True

    pool.after_job.append(mark_evicted)
    pool.reset_node_stores()
    pool.start_mirror()
    log = pool.log
    for phase in cfg.phases:
        controller = None
        notes: list[str] = []
        jobs = cfg.jobs
        nodes = None
        slots = None
        corrupt: dict[str, Any] | None = None
        if phase == "warm-mirror":
            pool.reset_node_stores()
            pool.restart_node_serves()
        if phase == "cold":
            if "mirror-restart" in faults:
                _throttle_largest(pool, 4.0)
                controller = mirror_restart_controller(notes)
            elif "evict" in faults:
                _throttle_largest(pool, 4.0)
                controller = evict_controller(notes)
        if phase == "warm-mirror" and "upstream-down" in faults:
            pool.stop_upstream()
            notes.append("upstream-down: the upstream was stopped after the cold phase")
            log("  fault: upstream stopped (the mirror is warm)")
        if phase == "warm-nodes" and "corrupt-node-blob" in faults:
            corrupt = corrupt_node_blob(pool, 0)
            notes.append(
                f"corrupt-node-blob: flipped a byte of {corrupt['filename']} in node 0's store "
                "and dropped its extracted copy from the node's package cache"
            )
            log(f"  fault: corrupted {corrupt['filename']} in node 0's store")

            def check_install(run: JobRun, sb: Path, c: dict[str, Any] = corrupt) -> None:
                if run.node == c["node"]:
                    run.checks["package_intact"] = installed_files_intact(sb, c["expected"])

            pool.after_job.append(check_install)
        if phase == "baseline" and "upstream-down" in faults:
            pool.start_upstream()
        if phase == "single":
            jobs, nodes, slots = SINGLE_RUNS, [0], 1
        log(f"phase {phase}: {jobs} jobs on {len(nodes or range(cfg.nodes))} node(s)")
        res = pool.run_phase(phase, jobs, nodes=nodes, slots=slots, controller=controller)
        res.notes.extend(notes)
        result.phases[phase] = res
        log(
            f"  {res.ok}/{len(res.runs)} runs exit 0 in {res.seconds:.1f} s; upstream "
            f"{res.upstream_bytes / pool.wl.env_bytes:.2f}x, site mirror "
            f"{res.mirror_bytes / pool.wl.env_bytes:.2f}x the environment"
        )
        if corrupt is not None:
            pool.after_job.pop()
            _recover_corrupt(pool, result, res, corrupt)
    _checks(pool, result, n)


def _checks(pool: Pool, result: PoolResult, n: int) -> None:
    """What every run must show (the expectations of issue 6), as (name, ok, detail)."""
    cfg = pool.cfg
    env = pool.wl.env_bytes
    faults = set(cfg.faults)
    for name, ph in result.phases.items():
        bad = [r for r in ph.runs if r.rc != 0 and not r.evicted]
        clear = all(
            r.error is not None
            or "bootstrap: ERROR" in r.stderr_tail
            or "pixicache failed" in r.stderr_tail
            for r in bad
        )
        expect_fail = name == "warm-nodes" and "corrupt-node-blob" in faults
        if not expect_fail:
            result.check(
                f"{name}: every job exits 0",
                not bad,
                "; ".join(f"job {r.job} exit {r.rc}" for r in bad),
            )
        else:
            result.check(f"{name}: failures carry a clear message", clear, f"{len(bad)} failed")
    cold = result.phases.get("cold")
    if cold is not None:
        per_path = cold.upstream_requests
        missing = [p for p in pool.wl.paths if p not in per_path]
        repeated = {p for p, c in per_path.items() if c != 1}
        ratio = cold.upstream_bytes / env
        direct = cold.upstream_bytes - cold.upstream_via_mirror  # jobs that fell through
        if "mirror-disk-full" in faults:
            result.check(
                "mirror-disk-full: what the full mirror cannot store, jobs fetch from upstream",
                not missing and direct > 0,
                f"upstream {ratio:.2f}x: {cold.upstream_via_mirror / env:.2f}x by the mirror, "
                f"{direct / env:.2f}x by jobs directly",
            )
        elif "mirror-restart" in faults:
            # A SIGKILLed mirror loses what it had received but not yet written: it asks
            # again for those bytes only (Range), so the overshoot is bounded by the
            # artifacts that were in flight at the kill.
            size = pool.wl.sizes
            allowance = sum(size[p] for p in repeated)
            result.check(
                "mirror-restart: upstream bytes <= 1x + the fills in flight at the kill",
                not missing and cold.upstream_bytes <= env + allowance + direct,
                f"{ratio:.3f}x; {len(repeated)} artifact(s) asked again "
                f"({sum('range' in r for r in cold.upstream_repeats)} resumed with Range); "
                f"{direct} B by jobs directly",
            )
        else:
            result.check(
                "cold: upstream requests == distinct artifacts (each once)",
                not missing and not repeated,
                f"missing {len(missing)}, repeated {len(repeated)}",
            )
            result.check(
                "cold: upstream bytes == 1.00x the environment",
                cold.upstream_bytes == env,
                f"{ratio:.3f}x",
            )
            if pool.wl.pypi:
                conda = cold.upstream_bytes - cold.upstream_pypi_bytes
                result.check(
                    "cold: upstream bytes == 1.00x for conda and for PyPI alike",
                    conda == pool.wl.conda_bytes and cold.upstream_pypi_bytes == pool.wl.pypi_bytes,
                    f"conda {conda / pool.wl.conda_bytes:.3f}x, "
                    f"PyPI {cold.upstream_pypi_bytes / pool.wl.pypi_bytes:.3f}x",
                )
        # Each node fetched each artifact at most once (an evicted run's own fills are
        # not in a report), and its store ends up holding all of them.
        fills = cold.per_node(cfg.nodes)
        bad_nodes = [i for i, blobs in cold.node_blobs.items() if fills[i][0] > n or blobs != n]
        result.check("cold: each node store filled once", not bad_nodes, f"nodes {bad_nodes}")
    if pool.wl.pypi:
        short = [
            f"{name} job {r.job}: {r.checks.get('pypi_installed')}"
            for name, ph in result.phases.items()
            for r in ph.runs
            if r.rc == 0 and r.checks.get("pypi_installed") != len(pool.wl.pypi)
        ]
        result.check(
            f"pypi: every job's environment has the {len(pool.wl.pypi)} wheels (INSTALLER uv-pixi)",
            not short,
            "; ".join(short[:5]),
        )
    wn = result.phases.get("warm-nodes")
    if wn is not None and "corrupt-node-blob" not in faults:
        result.check(
            "warm-nodes: nothing fetched (every artifact from the node store)",
            all(r.fills == 0 for r in wn.runs) and wn.upstream_bytes == 0,
            f"upstream {wn.upstream_bytes} B",
        )
    wm = result.phases.get("warm-mirror")
    if wm is not None and "mirror-disk-full" not in faults:
        result.check(
            "warm-mirror: upstream bytes == 0", wm.upstream_bytes == 0, f"{wm.upstream_bytes} B"
        )
    if "corrupt-node-blob" in faults and wn is not None:
        on0 = [r for r in wn.runs if r.node == 0]
        installed_bad = [r for r in wn.runs if r.checks.get("package_intact") is False]
        result.check(
            "corrupt-node-blob: the corrupt package is never installed", not installed_bad, ""
        )
        rec = result.phases.get("corrupt-recovery")
        result.check(
            "corrupt-node-blob: after `cache verify` the node runs jobs again",
            rec is not None and all(r.rc == 0 for r in rec.runs),
            f"node-0 jobs during the fault: {sum(r.rc == 0 for r in on0)}/{len(on0)} exit 0",
        )
    if "evict" in faults and cold is not None:
        ev = [r for r in cold.runs if r.evicted]
        rerun = [r for r in cold.runs if r.job == 0 and r.attempt == 2]
        result.check(
            "evict: the evicted run stopped by SIGTERM (exit 143), its re-run exit 0",
            len(ev) == 1
            and ev[0].rc == 128 + signal.SIGTERM
            and len(rerun) == 1
            and rerun[0].rc == 0,
            "; ".join(f"attempt {r.attempt} exit {r.rc}" for r in cold.runs if r.job == 0),
        )
        # every node got the environment from the mirror once; on top of that, the
        # mirror sent the evicted run at most one environment (kept or lost in flight)
        to_evicted = cold.mirror_bytes - cold.mirror_to_reported
        result.check(
            "evict: the site mirror sent each node the environment once, plus the evicted run's share",
            cold.mirror_to_reported <= cfg.nodes * env
            and cfg.nodes * env <= cold.mirror_bytes
            and to_evicted <= env,
            f"to reported runs {cold.mirror_to_reported / env:.2f}x, "
            f"to the evicted run {to_evicted / env:.2f}x the environment",
        )
    if cfg.squid and cold is not None:
        hits = sum(v for ph in result.phases.values() for k, v in ph.squid.items() if "HIT" in k)
        asked = sum(cold.mirror_requests.values())
        result.check(
            "squid: the mirror serves each artifact once, squid serves the rest",
            hits > 0 and asked == n and abs(cold.mirror_bytes / env - 1.0) < 0.05,
            f"mirror: {asked:.0f} artifact requests, {cold.mirror_bytes / env:.2f}x; squid hits {hits}",
        )
