"""Nodes, slots and jobs: the :class:`Pool`, its scheduler, and what one job or phase produced."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixicache.testing.condor import JOB_PATH, as_user, node_path

from .common import (
    _SPAWN_LOCK,
    BOOTSTRAP,
    CHANNEL,
    JOB_GID,
    JOB_UID,
    MANIFEST,
    PHASES,
    STAMP,
    TASK,
    _blobs,
    _link_or_copy,
    _tail,
    worker_python,
)
from .servers import ServeProcess, Squid, _serve_disk_reserve, small_filesystem
from .workload import PYPI_WHEELS, PreparedWorkload


def _installed_wheels(sb: Path) -> int:
    """How many distributions in the job's environment uv-pixi (pixicache, as Pixi) installed."""
    return sum(
        1
        for info in sb.glob(".pixi/envs/default/lib/python*/site-packages/*.dist-info")
        if (info / "INSTALLER").is_file() and (info / "INSTALLER").read_bytes() == b"uv-pixi"
    )


@dataclass
class JobRun:
    """One run of one job (an evicted job has two runs).

    Attributes:
        job: the job's number (its ``ProcId``); ``attempt``: 1, then 2 for a re-run.
        phase, node, slot: where it ran.
        rc: bootstrap.sh's exit code.
        seconds: wall time of the whole job.
        time_to_task: job start -> the task's first instruction (its stamp), or None.
        agent_time_to_task: the agent's own ``time_to_task`` (agent start -> task start).
        cpu: user + system CPU seconds of the job's processes.
        tiers: the report's ``tiers`` (artifacts/bytes/transferred per tier).
        installer_notes: the report's installer notes.
        error: the report's error (type, message, exit code), if any.
        stderr_tail: the last lines of ``_condor_stderr``.
        evicted: this run was stopped by the benchmark (SIGTERM).
        checks: extra facts a fault recorded about this run.
    """

    job: int
    attempt: int
    phase: str
    node: int
    slot: int
    rc: int | None = None
    seconds: float = 0.0
    time_to_task: float | None = None
    agent_time_to_task: float | None = None
    cpu: float = 0.0
    tiers: dict[str, Any] = field(default_factory=dict)
    installer_notes: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    evicted: bool = False
    checks: dict[str, Any] = field(default_factory=dict)

    def tier(self, name: str, key: str = "artifacts") -> int:
        return int((self.tiers.get(name) or {}).get(key, 0))

    @property
    def fills(self) -> int:
        """Artifacts this run brought into its node store (from any source)."""
        return sum(self.tier(t) for t in ("local", "mirror", "upstream"))

    def explain(self) -> str:
        return (
            f"job {self.job} (attempt {self.attempt}, {self.phase}, node {self.node}) exit {self.rc}"
            f"\n--- stdout ---\n{self.stdout_tail}\n--- stderr ---\n{self.stderr_tail}"
        )


@dataclass
class PhaseResult:
    """One phase: its runs and what the servers counted meanwhile."""

    name: str
    runs: list[JobRun]
    seconds: float
    upstream_bytes: int  # body bytes the upstream sent for package archives (and wheels)
    upstream_requests: dict[str, int]  # archive path -> GET requests
    upstream_via_mirror: int  # archive bytes the mirror pulled (its User-Agent)
    mirror_bytes: float  # bytes the site mirror served (its metrics)
    mirror_requests: dict[str, float]  # artifact requests by hit/miss/coalesced
    node_serve_bytes: float = 0.0
    squid: dict[str, int] = field(default_factory=dict)
    upstream_repeats: list[str] = field(default_factory=list)  # requests of a path asked twice+
    mirror_refused: int = 0  # requests the site mirror refused (429/503/507...)
    node_blobs: dict[int, int] = field(default_factory=dict)  # node -> blobs in its store after
    upstream_pypi_bytes: int = 0  # of upstream_bytes, those of PyPI wheels
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(1 for r in self.runs if r.rc == 0)

    def ttt(self) -> list[float]:
        return [r.time_to_task for r in self.runs if r.time_to_task is not None]

    @property
    def mirror_to_reported(self) -> int:
        """Bytes the site mirror sent to runs that wrote a report (all but evicted ones).

        ``mirror_bytes - mirror_to_reported`` is what an evicted run was sent: bytes it
        kept (resumed by the next job on its node) and bytes in flight when it was
        killed (socket buffers: at small scales, whole artifacts).
        """
        return sum(r.tier("mirror", "transferred") for r in self.runs if not r.evicted)

    def per_node(self, nodes: int) -> list[tuple[int, int]]:
        """(fills, store hits) per node, summed over the phase's runs."""
        out = [(0, 0)] * nodes
        for r in self.runs:
            f, h = out[r.node]
            out[r.node] = (f + r.fills, h + r.tier("store"))
        return out


@dataclass
class PoolConfig:
    """What to simulate (see the module doc and ``--help``)."""

    nodes: int = 10
    slots: int = 4
    jobs: int = 100
    scale: float = 0.01
    seed: int = 0
    phases: tuple[str, ...] = PHASES
    faults: tuple[str, ...] = ()
    node_serve: bool = False
    squid: bool = False
    workdir: Path | None = None
    bundle: Path | None = None
    keep: bool = False
    job_timeout: float = 900.0
    concurrency: int | None = None  # at most this many jobs run at once (None: every slot)
    verbose: bool = True
    worker_python: str | None = None  # the jobs' python3: a path or a version ("3.9", pyenv)
    users: int = 1  # Unix users sharing each node store (> 1: setpriv uids, root only)
    wheelhouse: Path | None = None  # pinned wheels for a bundle that runs on worker_python
    pypi: bool = False  # the workload with PyPI wheels ([pypi-dependencies]) besides conda
    shaped: str | None = None  # a tc rate ("1gbit"): the upstream behind a tbf-shaped veth (root)


@dataclass
class PoolResult:
    """Everything a run measured."""

    config: PoolConfig
    env_bytes: int
    artifacts: int
    phases: dict[str, PhaseResult]
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bundle_sha256: str = ""
    mirror_disk: str | None = None  # mirror-disk-full: "tmpfs" (real ENOSPC) or "max-size"

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append((name, bool(ok), detail))

    def to_json(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()}
        return {
            "config": cfg,
            "env_bytes": self.env_bytes,
            "artifacts": self.artifacts,
            "bundle_sha256": self.bundle_sha256,
            "mirror_disk": self.mirror_disk,
            "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
            "notes": self.notes,
            "phases": {
                name: {
                    **{k: v for k, v in dataclasses.asdict(p).items() if k != "runs"},
                    "runs": [dataclasses.asdict(r) for r in p.runs],
                }
                for name, p in self.phases.items()
            },
        }


class _Scheduler:
    """A queue of jobs and M x K slots: each free slot takes the next job (first free
    slot first, nodes interleaved), as HTCondor's negotiator matches idle jobs to
    idle slots. Jobs can be added while it runs (an evicted job is re-queued)."""

    def __init__(self, jobs: Sequence[tuple[int, int]]) -> None:
        self.queue: deque[tuple[int, int]] = deque(jobs)  # (job, attempt)
        self.outstanding = len(self.queue)
        self.cond = threading.Condition()

    def take(self) -> tuple[int, int] | None:
        with self.cond:
            while not self.queue:
                if self.outstanding == 0:
                    return None
                self.cond.wait()
            return self.queue.popleft()

    def done(self, requeue: tuple[int, int] | None = None) -> None:
        with self.cond:
            if requeue is not None:
                self.queue.append(requeue)
            else:
                self.outstanding -= 1
            self.cond.notify_all()


class _FairSlots:
    """A FIFO semaphore: with ``--concurrency`` below the slot count, the slots take
    turns (a slot that just finished a job queues behind the others)."""

    def __init__(self, n: int) -> None:
        self.free = max(1, n)
        self.lock = threading.Lock()
        self.waiters: deque[threading.Event] = deque()

    def __enter__(self) -> None:
        with self.lock:
            if self.free and not self.waiters:
                self.free -= 1
                return
            ev = threading.Event()
            self.waiters.append(ev)
        ev.wait()

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            if self.waiters:
                self.waiters.popleft().set()
            else:
                self.free += 1


class Pool:
    """The simulated pool: servers, nodes, the scheduler and the faults (see :func:`run_pool`)."""

    def __init__(self, cfg: PoolConfig, work: Path, wl: PreparedWorkload, bundle: Any) -> None:
        self.cfg = cfg
        self.work = work
        self.wl = wl
        self.bundle = bundle
        self.python, self.python_override = worker_python(cfg.worker_python)
        self.users = max(1, cfg.users)
        if self.users > 1 and os.geteuid() != 0:
            raise SystemExit("benchmarks/pool: --users > 1 runs jobs as other uids: it needs root")
        self.path = JOB_PATH
        if cfg.worker_python is not None:  # an EL9-like node: this is *the* python3 on PATH
            self.path = node_path(work / "node-bin", self.python)
            self.python_override = False
        self._mounts: contextlib.ExitStack = contextlib.ExitStack()
        self.link: Any = None
        if cfg.shaped:
            from netshape import ShapedLink, shaping_available

            why = shaping_available()
            if why:
                raise SystemExit(f"benchmarks/pool: --shaped: {why}")
            self.link = self._mounts.enter_context(ShapedLink(cfg.shaped))
        try:
            self.upstream = self._new_upstream(0)
        except BaseException:
            self._mounts.close()
            raise
        self.upstream_port = self.upstream.port
        self.lock = wl.write_lock(work / "pixi.lock", self.upstream.url)
        self.mirror: ServeProcess | None = None
        self.node_serves: list[ServeProcess] = []
        self.squid: Squid | None = None
        self.running: dict[tuple[int, int], tuple[subprocess.Popen[bytes], Path, float]] = {}
        self.running_lock = threading.Lock()
        self.log = print if cfg.verbose else (lambda *a, **k: None)
        self._cluster = 0
        self.disk_full_mounted: bool | None = None
        self.after_job: list[Callable[[JobRun, Path], None]] = []
        self.evicted: set[tuple[int, int]] = set()  # (job, attempt) stopped by a fault
        self.front = ""

    # -- layout ------------------------------------------------------------------------------

    def node_dir(self, node: int) -> Path:
        return self.work / "nodes" / f"node{node:02d}"

    def node_store(self, node: int) -> Path:
        return self.node_dir(node) / "store"

    def job_user(self, slot: int) -> int | None:
        """The uid a slot's jobs run as (``None``: this process's own), several per node
        as on a real pool: slot k runs as user k mod ``users``."""
        return None if self.users == 1 else JOB_UID + slot % self.users

    def prepare_node_store(self, node: int) -> None:
        """A node store as the README sets one up for several users: group-owned, setgid, sticky."""
        store = self.node_store(node)
        if self.users > 1 and not store.exists():
            store.mkdir(parents=True)
            os.chown(store, 0, JOB_GID)
            store.chmod(0o3775)

    def reset_node_stores(self) -> None:
        for node in range(self.cfg.nodes):
            shutil.rmtree(self.node_store(node), ignore_errors=True)
            shutil.rmtree(self.node_dir(node) / "serve-store", ignore_errors=True)

    # -- servers -----------------------------------------------------------------------------

    def start_mirror(self) -> None:
        """A cold site mirror (and squid, node serves as configured)."""
        cfg = self.cfg
        mirror_dir = self.work / "site-mirror"
        shutil.rmtree(mirror_dir, ignore_errors=True)
        mirror_dir.mkdir(parents=True)
        store = mirror_dir / "store"
        max_size = None
        if "mirror-disk-full" in cfg.faults:
            # room for 40% of the environment beyond the free space the mirror keeps
            budget = self.wl.env_bytes * 2 // 5
            mounted = self._mounts.enter_context(
                small_filesystem(store, budget + _serve_disk_reserve())
            )
            self.disk_full_mounted = mounted
            if not mounted:
                max_size = str(budget)
                self.log(f"  (cannot mount a tmpfs here: using --max-size {budget} instead)")
        # Every simulated node connects from 127.0.0.1, so the per-client cap (which
        # protects the mirror from one node) would count the whole pool as one client.
        self.mirror = ServeProcess(
            "site mirror",
            store,
            f"{self.upstream.url}/{CHANNEL}",
            mirror_dir / "serve.log",
            max_size,
            extra=["--per-client", "0", *self._pypi_upstream(mirror_dir, None)],
        ).start()
        front = self.mirror.url
        if cfg.squid:
            cache_mb = max(64, int(self.wl.env_bytes * 2 / (1 << 20)))
            self.squid = Squid(self.work / "squid", self.mirror.port, cache_mb).start()
            front = self.squid.url
        self.front = front
        self.node_serves = []
        if cfg.node_serve:
            for node in range(cfg.nodes):
                d = self.node_dir(node)
                d.mkdir(parents=True, exist_ok=True)
                self.node_serves.append(
                    ServeProcess(
                        f"node{node:02d} serve",
                        d / "serve-store",
                        f"{front}/{CHANNEL}",
                        d / "serve.log",
                        extra=self._pypi_upstream(d, front),
                    ).start()
                )

    def restart_node_serves(self) -> None:
        """Node serves with empty stores (a new set of nodes)."""
        for srv in self.node_serves:
            srv.stop()
            shutil.rmtree(srv.cache_dir, ignore_errors=True)
            srv.start()

    def _pypi_upstream(self, where: Path, front: str | None) -> list[str]:
        """``serve`` arguments for the PyPI workload's file host: the upstream's
        ``/pypi/packages`` for the site mirror; for a node serve the site mirror's
        ``/pypi-files``, standing in for the upstream URLs the lock names (an alias)."""
        if not self.wl.pypi:
            return []
        files = f"{self.upstream.url}/pypi/packages"
        if front is None:
            return ["--upstream", f"pypi-files={files}"]
        cfg = where / "serve-pypi.toml"
        where.mkdir(parents=True, exist_ok=True)
        cfg.write_text(
            "[serve.upstreams]\n"
            f'pypi-files = {{ url = "{front}/pypi-files", aliases = ["{files}"] }}\n'
        )
        return ["--config", str(cfg)]

    def mirror_for(self, node: int) -> str:
        """What a job on ``node`` has as ``PIXICACHE_MIRROR``."""
        if self.node_serves:
            return self.node_serves[node].url
        return self.front

    def stop_upstream(self) -> None:
        self.upstream.stop()

    def start_upstream(self) -> None:
        self.upstream.stop()
        self.upstream = self._new_upstream(self.upstream_port)

    def _new_upstream(self, port: int) -> Any:
        """The counting upstream on ``port`` (0: any): on 127.0.0.1, or with ``--shaped``
        inside the link's namespace, reached through the shaped veth."""
        from pixicache.testing import UpstreamServer

        if self.link is None:
            return UpstreamServer(self.wl.root, port=port).start()
        link = self.link
        return link.run_inside(
            lambda: UpstreamServer(self.wl.root, host=link.upstream_ip, port=port).start()
        )

    def close(self) -> None:
        for srv in self.node_serves:
            with contextlib.suppress(Exception):
                srv.stop()
        if self.squid is not None:
            self.squid.stop()
            self.squid.results_at_close = self.squid.results()  # type: ignore[attr-defined]
            self.squid.cleanup(keep_logs=self.work / "squid-logs")
        if self.mirror is not None:
            with contextlib.suppress(Exception):
                self.mirror.stop()
        self.upstream.stop()
        self._mounts.close()

    # -- one job -----------------------------------------------------------------------------

    def make_sandbox(self, phase: str, job: int, attempt: int, node: int) -> Path:
        """A scratch dir holding only what the submit file transfers."""
        from pixicache.testing.condor import write_ads

        sb = self.work / "execute" / f"node{node:02d}" / f"dir_{phase}_{job}_{attempt}"
        shutil.rmtree(sb, ignore_errors=True)
        sb.mkdir(parents=True)
        shutil.copy2(BOOTSTRAP, sb / "bootstrap.sh")
        _link_or_copy(Path(self.bundle.path), sb / "pixicache.pyz")
        (sb / "pixi.toml").write_text(self.manifest())
        shutil.copy2(self.lock, sb / "pixi.lock")
        write_ads(sb, cluster=self._cluster, proc=job, machine=f"node{node:02d}.pool.test")
        return sb

    def manifest(self) -> str:
        """The workspace's ``pixi.toml`` (with ``[pypi-dependencies]`` for the PyPI workload)."""
        if not self.wl.pypi:
            return MANIFEST
        deps = "".join(f'{name} = "*"\n' for name, _, _ in PYPI_WHEELS)
        return MANIFEST.replace("\n[tasks]", f"\n[pypi-dependencies]\n{deps}\n[tasks]")

    def give_to(self, sb: Path, uid: int | None, home: Path) -> None:
        """Make the sandbox (and the user's home) the job user's, as the starter does."""
        if uid is None:
            return
        for path in (sb, *sb.rglob("*"), home):
            os.chown(path, uid, JOB_GID, follow_symlinks=False)

    def home(self, node: int, slot: int) -> Path:
        uid = self.job_user(slot)
        home = self.node_dir(node) / ("home" if uid is None else f"home-{uid}")
        home.mkdir(parents=True, exist_ok=True)
        return home

    def job_env(self, sb: Path, node: int, slot: int, phase: str) -> dict[str, str]:
        """The environment HTCondor's starter gives the job, plus the site's settings."""
        from pixicache.testing.condor import starter_environment

        env = starter_environment(sb, home=self.home(node, slot), slot=slot + 1)
        env["PATH"] = self.path
        env["PIXICACHE_TASK"] = TASK
        if phase == "baseline":
            # The seed's way: no mirror, no shared store; only the agent's unpacked
            # files are shared per node, so the baseline is not charged an unpack per job.
            env["PIXICACHE_CACHE_DIR"] = str(sb.parent / f".store-{sb.name}")
            env["PIXICACHE_SOURCES"] = "upstream"
            env["PIXICACHE_BUNDLE_DIR"] = str(self.node_dir(node) / "bundle-baseline")
        else:
            self.prepare_node_store(node)
            env["PIXICACHE_CACHE_DIR"] = str(self.node_store(node))
            env["PIXICACHE_MIRROR"] = self.mirror_for(node)  # sources: mirror, then upstream
        if self.python_override:
            env["PIXICACHE_PYTHON"] = self.python
        return env

    def run_job(self, phase: str, job: int, attempt: int, node: int, slot: int) -> JobRun:
        run = JobRun(job, attempt, phase, node, slot)
        # One sandbox is written and spawned at a time: a child forked by another slot
        # while bootstrap.sh is open for writing here would make its exec fail (ETXTBSY).
        with _SPAWN_LOCK:
            sb = self.make_sandbox(phase, job, attempt, node)
            env = self.job_env(sb, node, slot, phase)
            uid = self.job_user(slot)
            self.give_to(sb, uid, self.home(node, slot))
            argv = [str(sb / "bootstrap.sh")]
            if uid is not None:
                argv = as_user(uid, JOB_GID, argv)
            out = open(sb / "_condor_stdout", "wb")  # noqa: SIM115 - closed below
            err = open(sb / "_condor_stderr", "wb")  # noqa: SIM115
            started = time.time()
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=sb,
                    env=env,
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group, killed on a timeout
                )
            finally:
                out.close()
                err.close()
        with self.running_lock:
            self.running[(job, attempt)] = (proc, sb, t0)
        timer = threading.Timer(self.cfg.job_timeout, self._timeout, (proc,))
        timer.daemon = True
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            with self.running_lock:
                self.running.pop((job, attempt), None)
        proc.returncode = os.waitstatus_to_exitcode(status)
        run.rc = proc.returncode
        run.seconds = time.monotonic() - t0
        run.cpu = usage.ru_utime + usage.ru_stime
        stamp = sb / STAMP
        if stamp.is_file():
            with contextlib.suppress(ValueError):
                run.time_to_task = float(stamp.read_text().strip()) - started
        report = sb / "out" / "pixicache-report.json"
        if report.is_file():
            with contextlib.suppress(ValueError, OSError):
                data = json.loads(report.read_text())
                run.agent_time_to_task = data.get("time_to_task")
                run.tiers = data.get("tiers") or {}
                run.error = data.get("error")
                run.installer_notes = list((data.get("installer") or {}).get("notes") or [])
        run.stdout_tail = _tail(sb / "_condor_stdout", 12)
        run.stderr_tail = _tail(sb / "_condor_stderr", 12)
        if self.wl.pypi and run.rc == 0:
            run.checks["pypi_installed"] = _installed_wheels(sb)
        for hook in self.after_job:
            hook(run, sb)
        if not self.cfg.keep:
            shutil.rmtree(sb, ignore_errors=True)
            if phase == "baseline":
                shutil.rmtree(sb.parent / f".store-{sb.name}", ignore_errors=True)
        return run

    def _timeout(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    # -- one phase ---------------------------------------------------------------------------

    def run_phase(
        self,
        name: str,
        jobs: int,
        *,
        nodes: Sequence[int] | None = None,
        slots: int | None = None,
        controller: Callable[[Pool, _Scheduler, list[JobRun]], None] | None = None,
    ) -> PhaseResult:
        """Run ``jobs`` jobs on the pool's slots; returns what was measured."""
        nodes = list(range(self.cfg.nodes)) if nodes is None else list(nodes)
        slots = self.cfg.slots if slots is None else slots
        self._cluster += 1
        self.upstream.reset_log()
        mirror0 = self.mirror.bytes_served if self.mirror else 0.0
        req0 = self.mirror.artifact_requests() if self.mirror else {}
        refused0 = self.mirror.refused() if self.mirror else 0.0
        node0 = sum(s.bytes_served for s in self.node_serves)
        squid0 = self.squid.results() if self.squid else {}
        sched = _Scheduler([(j, 1) for j in range(jobs)])
        runs: list[JobRun] = []
        runs_lock = threading.Lock()
        cap = _FairSlots(self.cfg.concurrency or len(nodes) * slots)

        def slot_worker(node: int, slot: int) -> None:
            while True:
                with cap:  # a slot whose job cannot get a CPU here waits, unclaimed
                    item = sched.take()
                    if item is None:
                        return
                    job, attempt = item
                    try:
                        run = self.run_job(name, job, attempt, node, slot)
                    except Exception as exc:  # a benchmark bug: record it, go on
                        run = JobRun(job, attempt, name, node, slot, rc=-1, stderr_tail=repr(exc))
                with runs_lock:
                    runs.append(run)
                sched.done((job, attempt + 1) if run.evicted else None)

        # interleave the nodes: slot 1 of every node first, as a negotiator spreads a cluster
        order = [(n, s) for s in range(slots) for n in nodes]
        threads = [
            threading.Thread(target=slot_worker, args=o, name=f"slot-{o[0]}-{o[1]}", daemon=True)
            for o in order
        ]
        t0 = time.monotonic()
        ctl = None
        if controller is not None:
            ctl = threading.Thread(target=controller, args=(self, sched, runs), daemon=True)
            ctl.start()
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # Ctrl-C: stop the running jobs (their process groups)
            sched.queue.clear()
            with self.running_lock:
                procs = [p for p, _, _ in self.running.values()]
            for proc in procs:
                self._timeout(proc)
            raise
        if ctl is not None:
            ctl.join(timeout=60)
        seconds = time.monotonic() - t0
        self.upstream.wait_idle(30)
        paths = set(self.wl.paths)
        recs = [r for r in self.upstream.requests if r.path in paths and r.method == "GET"]
        counts: dict[str, int] = {}
        for r in recs:
            counts[r.path] = counts.get(r.path, 0) + 1
        via_mirror = sum(
            r.bytes_sent
            for r in recs
            if r.headers.get("user-agent", "").startswith("pixicache-serve")
        )
        mirror_bytes = (self.mirror.bytes_served - mirror0) if self.mirror else 0.0
        req1 = self.mirror.artifact_requests() if self.mirror else {}
        refused = (self.mirror.refused() - refused0) if self.mirror else 0.0
        squid1 = self.squid.results() if self.squid else {}
        runs.sort(key=lambda r: (r.job, r.attempt))
        repeated = [
            f"{r.path.rsplit('/', 1)[-1]}: {r.status} {r.bytes_sent} B"
            + (f" range {r.range}" if r.range else "")
            + ("" if r.complete else " (incomplete)")
            for r in recs
            if counts[r.path] > 1
        ]
        return PhaseResult(
            name=name,
            runs=runs,
            seconds=seconds,
            upstream_bytes=sum(r.bytes_sent for r in recs),
            upstream_pypi_bytes=sum(r.bytes_sent for r in recs if r.path.startswith("/pypi/")),
            upstream_requests=counts,
            upstream_via_mirror=via_mirror,
            mirror_bytes=mirror_bytes,
            mirror_requests={k: req1.get(k, 0.0) - req0.get(k, 0.0) for k in req1},
            node_serve_bytes=sum(s.bytes_served for s in self.node_serves) - node0,
            squid={k: squid1.get(k, 0) - squid0.get(k, 0) for k in squid1},
            upstream_repeats=repeated,
            mirror_refused=int(refused),
            node_blobs={i: len(_blobs(self.node_store(i))) for i in sorted({r.node for r in runs})},
        )
