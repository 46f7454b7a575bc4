#!/usr/bin/env python3
"""Simulate an HTCondor pool on one machine and measure what pixicache does to it (issue 6).

What it builds (everything on 127.0.0.1, everything real):

* one **counting upstream** (:class:`pixicache.testing.UpstreamServer`) playing
  conda-forge, serving the size-faithful synthetic environment of the shared
  GPU lock (``make_package_workload``: 121 REAL installable conda packages,
  3.7 GB at ``--scale 1.0``) plus a tiny ``pool-task`` package whose program is
  the job's task;
* one **site mirror**: a ``pixicache serve`` process whose upstream is the
  counting server (optionally behind **squid** as a reverse proxy, ``--squid``);
* M **execute nodes** (``--nodes``, default 10) x K **slots** (``--slots``,
  default 4): each node has its own node store (``PIXICACHE_CACHE_DIR``) and,
  with ``--node-serve``, its own node-local ``pixicache serve`` whose upstream
  is the site mirror;
* N **jobs** (``--jobs``, default 100), scheduled like HTCondor's negotiator
  would: a slot runs one job at a time and each job goes to the first free
  slot, in waves as slots free up. Every job runs the REAL ``bootstrap.sh`` in
  a fresh sandbox holding only the transferred files (``bootstrap.sh``, the
  single-file agent ``pixicache.pyz``, ``pixi.toml``, ``pixi.lock``, the job
  and machine ads), with HTCondor's job environment, a ``PATH`` without any
  virtualenv, and the system python3 running the agent in isolated mode, as
  ``tests/test_bootstrap.py`` does. The task (``pool-task``) only stamps the
  time it started: the measurement is **time-to-task** (job start -> task start).

Phases (``--phases``; default all, in this order):

``cold``         empty upstream cache everywhere: empty site mirror, empty node stores;
``warm-mirror``  new (empty) node stores, the site mirror kept;
``warm-nodes``   the node stores kept;
``single``       one job at a time on a warm node (3 runs): the reference for
                 the warm-nodes ratio;
``baseline``     the seed's way: every job fetches every package from upstream
                 itself (``PIXICACHE_SOURCES=upstream``) into its own empty store.

Output (``--out DIR``, default ``./pool-results``): ``pool.md`` (a markdown
table: upstream bytes / environment bytes, site-mirror bytes / environment
bytes, node-store fills and hits per node, p50/p95/max time-to-task),
``pool.png`` (matplotlib) and ``pool.json`` (every job). The table is also
printed.

Faults (``--fault``, repeatable), each also a test in ``tests/test_pool.py``:

``mirror-restart``    the site mirror is SIGKILLed while it streams a fill (the
                      largest artifact is throttled upstream so the kill lands
                      mid-transfer) and restarted on the same port at once;
``upstream-down``     the upstream is stopped after the cold phase (the mirror
                      is warm); it comes back for the baseline;
``corrupt-node-blob`` before ``warm-nodes``, one byte of one blob in node 0's
                      store is flipped and that package's extracted copy is
                      dropped from the node's package cache (so the blob is
                      needed again); afterwards ``pixicache cache verify`` is run
                      on the node and one job re-run, to show recovery;
``evict``             one job gets SIGTERM mid-install (during its fetch) and is
                      re-run, as HTCondor reschedules an evicted job;
``mirror-disk-full``  the site mirror's store lives on a tmpfs smaller than the
                      environment (real ENOSPC; where mounting is not allowed,
                      a ``--max-size`` budget of the same size instead).

Simulation limits: all nodes share this machine's CPUs (``--concurrency C``
lets at most C jobs run at once, e.g. the core count, for timings free of CPU
queueing) and its address 127.0.0.1 (so the site mirror runs with
``--per-client 0``: its per-client cap is meant per node).

Examples::

    python benchmarks/pool.py --scale 0.01 --nodes 3 --slots 2 --jobs 8      # ~1-2 min
    python benchmarks/pool.py --scale 0.1                                     # the acceptance run
    python benchmarks/pool.py --scale 0.01 --fault mirror-restart --fault evict
    python benchmarks/pool.py --scale 0.01 --squid --phases cold,warm-mirror

Requirements: the ``bench`` extra (``pip install -e '.[bench]'``: py-rattler,
aiohttp, prometheus_client, matplotlib), bash and coreutils, a python3 >= 3.10
outside any virtualenv for the jobs (else this interpreter's base is used), and
for ``--squid`` the Debian ``squid`` package. Disk: about (nodes + 2 x running
baseline jobs) x 2 x environment bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = REPO / "bootstrap.sh"
CHANNEL = "conda-forge"
TEMPLATE_BASE = "https://conda.anaconda.org/conda-forge"  # in the cached lock template
TASK = "ready"
TASK_PACKAGE = "pool-task"
STAMP = "pool-task-started"
PHASES = ("cold", "warm-mirror", "warm-nodes", "single", "baseline")
FAULTS = ("mirror-restart", "upstream-down", "corrupt-node-blob", "evict", "mirror-disk-full")
SINGLE_RUNS = 3
_SPAWN_LOCK = threading.Lock()

MANIFEST = f"""\
# The pool benchmark's workspace: the synthetic GPU environment plus `{TASK_PACKAGE}`.
[workspace]
name = "pixicache-pool-benchmark"
channels = ["{CHANNEL}"]
platforms = ["linux-64"]

[dependencies]
{TASK_PACKAGE} = "*"

[tasks]
{TASK} = "{TASK_PACKAGE}"
"""

__all__ = [
    "FAULTS",
    "PHASES",
    "JobRun",
    "PhaseResult",
    "PoolConfig",
    "PoolResult",
    "PreparedWorkload",
    "ServeProcess",
    "Squid",
    "free_port",
    "main",
    "markdown_report",
    "plot",
    "prepare_workload",
    "run_pool",
    "squid_config",
]


# -- small helpers ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g} s")
        time.sleep(0.02)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; ``None`` for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _blobs(store: Path) -> list[Path]:
    root = store / "sha256"
    if not root.is_dir():
        return []
    return [p for sub in root.iterdir() if sub.is_dir() for p in sub.iterdir()]


def job_python() -> tuple[str, bool]:
    """The python3 a job uses: (path, whether bootstrap must be told via PIXICACHE_PYTHON)."""
    from pixicache.testing.condor import job_python as find

    found = find((3, 10))  # rattler needs 3.10
    if found is None:
        raise SystemExit("pool.py: no python3 >= 3.10 outside a virtualenv to run the jobs with")
    return found


# -- the workload ----------------------------------------------------------------------------


@dataclass
class PreparedWorkload:
    """The upstream's files: the synthetic GPU environment and the task package.

    Attributes:
        root: the directory the upstream serves (``root/conda-forge/<subdir>/<file>``).
        lock_template: a ``pixi.lock`` for every package, with
            ``https://conda.anaconda.org/conda-forge`` URLs (see :meth:`write_lock`).
        packages: ``[(subdir, filename, sha256, size)]``, the task package included.
        scale, seed: how the workload was made.
    """

    root: Path
    lock_template: Path
    packages: list[tuple[str, str, str, int]]
    scale: float
    seed: int

    @property
    def env_bytes(self) -> int:
        """The environment's bytes (the sum of its archives' sizes)."""
        return sum(p[3] for p in self.packages)

    @property
    def paths(self) -> list[str]:
        """The archives' URL paths on the upstream (``/conda-forge/<subdir>/<file>``)."""
        return [f"/{CHANNEL}/{sub}/{name}" for sub, name, _, _ in self.packages]

    def largest(self, ext: str = ".conda") -> tuple[str, str, str, int]:
        """The largest package archive whose name ends with ``ext``."""
        return max((p for p in self.packages if p[1].endswith(ext)), key=lambda p: p[3])

    def write_lock(self, path: Path, upstream_url: str) -> Path:
        """The lock with the upstream's URLs (so the ``upstream`` source reaches it)."""
        text = self.lock_template.read_text()
        path.write_text(text.replace(TEMPLATE_BASE, upstream_url.rstrip("/") + "/" + CHANNEL))
        return path


def task_package_spec() -> Any:
    """``pool-task``: a real package whose ``bin/pool-task`` stamps when the task started."""
    from pixicache.testing import PLACEHOLDER, FileSpec, PackageSpec, current_subdir

    script = (
        "#!/bin/sh\n"
        "# pool-task: the pool benchmark's task. Stamps the time it started (the\n"
        "# end of time-to-task) in the job's scratch dir, then says where it runs.\n"
        f'stamp="${{_CONDOR_SCRATCH_DIR:-.}}/{STAMP}"\n'
        'date +%s.%N > "$stamp.tmp" && mv -f "$stamp.tmp" "$stamp"\n'
        f'echo "pool-task: environment ready in {PLACEHOLDER}"\n'
    )
    return PackageSpec(
        TASK_PACKAGE,
        "1.0.0",
        "h0_0",
        subdir=current_subdir(),
        files={f"bin/{TASK_PACKAGE}": FileSpec(script, mode=0o755)},
    )


def prepare_workload(root: Path, scale: float, seed: int = 0) -> PreparedWorkload:
    """Build (or reuse, if ``root`` holds the same scale and seed) the upstream's files."""
    from pixicache.testing import make_package_workload

    root = Path(root).resolve()
    marker = root / "pool-workload.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("scale") == scale and meta.get("seed") == seed:
            return PreparedWorkload(
                root,
                root / "pool.lock.template",
                [tuple(p) for p in meta["packages"]],  # type: ignore[misc]
                scale,
                seed,
            )
    if root.exists():
        shutil.rmtree(root)
    wl = make_package_workload(root, scale=scale, seed=seed)
    if len(wl.channels) != 1 or wl.channels[0].name != CHANNEL:
        raise RuntimeError(f"expected one channel named {CHANNEL}, got {wl.channels}")
    channel = wl.channels[0]
    channel.add([task_package_spec()])
    template = root / "pool.lock.template"
    template.write_text(channel.render_lock(TEMPLATE_BASE))
    packages = [(p.subdir, p.filename, p.sha256, p.size) for p in channel.packages]
    marker.write_text(json.dumps({"scale": scale, "seed": seed, "packages": packages}))
    return PreparedWorkload(root, template, packages, scale, seed)  # type: ignore[arg-type]


# -- servers: pixicache serve, squid ---------------------------------------------------------


class ServeProcess:
    """A ``pixicache serve`` process (site mirror or node cache), restartable on its port.

    Args:
        name: for messages and its log file.
        cache_dir: its store.
        upstream: the ``conda-forge`` upstream URL (``http://host:port/conda-forge``).
        log: where its stderr goes (appended across restarts).
        max_size: ``--max-size`` (e.g. ``"20M"``), if any.
    """

    def __init__(
        self,
        name: str,
        cache_dir: Path,
        upstream: str,
        log: Path,
        max_size: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.extra = list(extra)
        self.cache_dir = cache_dir
        self.upstream = upstream
        self.log = log
        self.max_size = max_size
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._counted: dict[str, float] = {}  # metrics of instances that are gone
        self._last: dict[str, float] = {}  # the last scrape of the running instance

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> ServeProcess:
        argv = [
            sys.executable, "-m", "pixicache", "serve", "--host", "127.0.0.1",
            "--port", str(self.port), "--cache-dir", str(self.cache_dir),
            "--upstream", f"{CHANNEL}={self.upstream}", "--quiet",
        ]  # fmt: skip
        if self.max_size:
            argv += ["--max-size", self.max_size]
        argv += self.extra
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        try:
            _wait_port(self.port, self.proc, timeout, f"pixicache serve ({self.name})")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{_tail(self.log)}") from None
        self._last = {}
        return self

    def kill(self) -> None:
        """SIGKILL (a crash): running responses break, partial fills stay on disk."""
        self.scrape()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for k, v in self._last.items():
            self._counted[k] = self._counted.get(k, 0.0) + v
        self._last = {}

    def restart(self) -> float:
        """Kill and start again on the same port; returns the seconds it was down."""
        t = time.monotonic()
        self.kill()
        self.start()
        self.restarts += 1
        return time.monotonic() - t

    def stop(self) -> None:
        """Graceful stop (SIGTERM), as systemd does."""
        self.scrape()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for k, v in self._last.items():
            self._counted[k] = self._counted.get(k, 0.0) + v
        self._last = {}
        self.proc = None

    def scrape(self) -> dict[str, float]:
        """The running instance's metrics (``name{labels}`` -> value); ``{}`` if down."""
        if self.proc is None or self.proc.poll() is not None:
            return {}
        import httpx

        try:
            text = httpx.get(self.url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
        self._last = out
        return out

    def metric(self, name: str) -> float:
        """A counter summed over every instance so far (restarts included)."""
        now = self.scrape()
        return self._counted.get(name, 0.0) + now.get(name, self._last.get(name, 0.0))

    @property
    def bytes_served(self) -> float:
        return self.metric("pixicache_serve_bytes_served_total")

    def refused(self) -> float:
        """Requests and connections refused (any reason), restarts included."""
        return sum(
            self.metric(f'pixicache_serve_refused_total{{reason="{r}"}}')
            for r in ("connections", "per_client", "path", "store_full")
        )

    def artifact_requests(self) -> dict[str, float]:
        """Artifact requests by cache outcome (hit, miss, coalesced), restarts included."""
        return {
            r: self.metric(f'pixicache_serve_cache_total{{result="{r}"}}')
            for r in ("hit", "miss", "coalesced")
        }


def squid_config(
    directory: Path, port: int, mirror_port: int, cache_mb: int, user: str | None = None
) -> str:
    """A squid (>= 4) configuration: a caching reverse proxy (accelerator) in front of a
    ``pixicache serve`` mirror on 127.0.0.1:``mirror_port``, listening on 127.0.0.1:``port``.

    Package archives are immutable (the mirror sends ``Cache-Control: public,
    max-age=31536000, immutable`` and ``ETag`` = digest): squid keeps them on disk
    (``cache_dir``, ``cache_mb`` MiB), collapses concurrent misses into one
    request to the mirror, and never caches the mirror's dynamic endpoints.
    """
    d = Path(directory)
    lines = [
        "# squid in front of `pixicache serve`: generated by benchmarks/pool.py",
        f"http_port 127.0.0.1:{port} accel defaultsite=pixicache-mirror no-vhost",
        f"cache_peer 127.0.0.1 parent {mirror_port} 0 no-query originserver name=mirror",
        "acl pkgs urlpath_regex \\.(conda|tar\\.bz2)$",
        "acl dynamic urlpath_regex ^/(healthz|metrics|admin)",
        "http_access allow localhost",
        "http_access deny all",
        "cache_peer_access mirror allow all",
        "never_direct allow all",
        "cache deny dynamic",
        f"cache_dir ufs {d / 'cache'} {cache_mb} 16 256",
        "maximum_object_size 16 GB",
        "cache_mem 256 MB",
        "maximum_object_size_in_memory 64 MB",
        "collapsed_forwarding on",
        "# a client that goes away (an evicted job) does not abort the fill",
        "quick_abort_min -1 KB",
        "# Range requests (resumes) are served from the whole object, fetched once",
        "range_offset_limit -1 pkgs",
        "refresh_pattern -i \\.(conda|tar\\.bz2)$ 525600 100% 525600",
        "refresh_pattern . 0 20% 4320",
        "logformat pixicache %ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %Sh/%<a",
        f"access_log stdio:{d / 'access.log'} pixicache",
        f"cache_log {d / 'cache.log'}",
        f"pid_filename {d / 'squid.pid'}",
        f"coredump_dir {d}",
        "logfile_rotate 0",
        "shutdown_lifetime 1 seconds",
        "forwarded_for on",
    ]
    if user:
        lines.append(f"cache_effective_user {user}")
    return "\n".join(lines) + "\n"


class Squid:
    """A squid reverse proxy in front of the site mirror (see :func:`squid_config`)."""

    def __init__(self, directory: Path, mirror_port: int, cache_mb: int) -> None:
        self.exe = shutil.which("squid") or "/usr/sbin/squid"
        if not os.path.exists(self.exe):
            raise RuntimeError("squid is not installed (Debian: apt-get install squid)")
        self.port = free_port()
        user = None
        self._own_dir = False
        if os.geteuid() == 0:
            # squid drops root for its cache_effective_user, which must reach its files:
            # a private dir directly under the system temp dir (a pool's work dir may be
            # under a 0700 parent), removed on stop.
            import pwd

            user = "proxy"
            directory = Path(tempfile.mkdtemp(prefix="pixicache-squid-"))
            self._own_dir = True
            with contextlib.suppress(KeyError, OSError):
                pw = pwd.getpwnam(user)
                os.chown(directory, pw.pw_uid, pw.pw_gid)
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "squid.conf"
        self.conf.write_text(squid_config(self.dir, self.port, mirror_port, cache_mb, user))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.dir / "access.log"

    def start(self) -> Squid:
        init = subprocess.run(
            [self.exe, "-N", "-z", "-f", str(self.conf)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if init.returncode != 0:
            raise RuntimeError(f"squid -z failed: {init.stderr}{_tail(self.dir / 'cache.log')}")
        with open(self.dir / "squid.out", "ab") as out:
            self.proc = subprocess.Popen(
                [self.exe, "-N", "-f", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            _wait_port(self.port, self.proc, 60, "squid")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{_tail(self.dir / 'cache.log')}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self, keep_logs: Path | None = None) -> None:
        """Remove the squid dir it made (copying its logs to ``keep_logs`` first)."""
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for name in ("squid.conf", "access.log", "cache.log"):
                with contextlib.suppress(OSError):
                    shutil.copy2(self.dir / name, keep_logs / name)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def results(self) -> dict[str, int]:
        """Package requests in the access log, by squid result code (TCP_HIT, TCP_MISS...)."""
        out: dict[str, int] = {}
        if not self.access_log.is_file():
            return out
        for line in self.access_log.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) < 7 or not re.search(r"\.(conda|tar\.bz2)$", parts[6]):
                continue
            code = parts[3].split("/", 1)[0]
            out[code] = out.get(code, 0) + 1
        return out


def _serve_disk_reserve() -> int:
    """The free space `pixicache serve` keeps beyond a fill's size (it answers 507 below)."""
    try:
        from pixicache.serve.fill import DISK_RESERVE
    except ImportError:  # pragma: no cover - the serve extra is missing
        return 16 << 20
    return int(DISK_RESERVE)


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int) -> Iterator[bool]:
    """Mount a tmpfs of ``size_bytes`` at ``path`` (root only); yields whether it worked."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={max(size_bytes, 1 << 20)}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        mounted = proc.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- jobs ------------------------------------------------------------------------------------


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
    upstream_bytes: int  # body bytes the upstream sent for package archives
    upstream_requests: dict[str, int]  # archive path -> GET requests
    upstream_via_mirror: int  # archive bytes the mirror pulled (its User-Agent)
    mirror_bytes: float  # bytes the site mirror served (its metrics)
    mirror_requests: dict[str, float]  # artifact requests by hit/miss/coalesced
    node_serve_bytes: float = 0.0
    squid: dict[str, int] = field(default_factory=dict)
    upstream_repeats: list[str] = field(default_factory=list)  # requests of a path asked twice+
    mirror_refused: int = 0  # requests the site mirror refused (429/503/507...)
    node_blobs: dict[int, int] = field(default_factory=dict)  # node -> blobs in its store after
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


# -- the pool --------------------------------------------------------------------------------


class Pool:
    """The simulated pool: servers, nodes, the scheduler and the faults (see :func:`run_pool`)."""

    def __init__(self, cfg: PoolConfig, work: Path, wl: PreparedWorkload, bundle: Any) -> None:
        from pixicache.testing import UpstreamServer

        self.cfg = cfg
        self.work = work
        self.wl = wl
        self.bundle = bundle
        self.python, self.python_override = job_python()
        self.upstream = UpstreamServer(wl.root).start()
        self.upstream_port = self.upstream.port
        self.lock = wl.write_lock(work / "pixi.lock", self.upstream.url)
        self.mirror: ServeProcess | None = None
        self.node_serves: list[ServeProcess] = []
        self.squid: Squid | None = None
        self.running: dict[tuple[int, int], tuple[subprocess.Popen[bytes], Path, float]] = {}
        self.running_lock = threading.Lock()
        self.log = print if cfg.verbose else (lambda *a, **k: None)
        self._cluster = 0
        self._mounts: contextlib.ExitStack = contextlib.ExitStack()
        self.disk_full_mounted: bool | None = None
        self.after_job: list[Callable[[JobRun, Path], None]] = []
        self.evicted: set[tuple[int, int]] = set()  # (job, attempt) stopped by a fault
        self.front = ""

    # -- layout ------------------------------------------------------------------------------

    def node_dir(self, node: int) -> Path:
        return self.work / "nodes" / f"node{node:02d}"

    def node_store(self, node: int) -> Path:
        return self.node_dir(node) / "store"

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
            extra=["--per-client", "0"],
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
                    ).start()
                )

    def restart_node_serves(self) -> None:
        """Node serves with empty stores (a new set of nodes)."""
        for srv in self.node_serves:
            srv.stop()
            shutil.rmtree(srv.cache_dir, ignore_errors=True)
            srv.start()

    def mirror_for(self, node: int) -> str:
        """What a job on ``node`` has as ``PIXICACHE_MIRROR``."""
        if self.node_serves:
            return self.node_serves[node].url
        return self.front

    def stop_upstream(self) -> None:
        self.upstream.stop()

    def start_upstream(self) -> None:
        from pixicache.testing import UpstreamServer

        self.upstream.stop()
        self.upstream = UpstreamServer(self.wl.root, port=self.upstream_port).start()

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
        (sb / "pixi.toml").write_text(MANIFEST)
        shutil.copy2(self.lock, sb / "pixi.lock")
        write_ads(sb, cluster=self._cluster, proc=job, machine=f"node{node:02d}.pool.test")
        return sb

    def job_env(self, sb: Path, node: int, slot: int, phase: str) -> dict[str, str]:
        """The environment HTCondor's starter gives the job, plus the site's settings."""
        from pixicache.testing.condor import starter_environment

        home = self.node_dir(node) / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = starter_environment(sb, home=home, slot=slot + 1)
        env["PIXICACHE_TASK"] = TASK
        if phase == "baseline":
            # The seed's way: no mirror, no shared store; only the agent's unpacked
            # files are shared per node, so the baseline is not charged an unpack per job.
            env["PIXICACHE_CACHE_DIR"] = str(sb.parent / f".store-{sb.name}")
            env["PIXICACHE_SOURCES"] = "upstream"
            env["PIXICACHE_BUNDLE_DIR"] = str(self.node_dir(node) / "bundle-baseline")
        else:
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
            out = open(sb / "_condor_stdout", "wb")  # noqa: SIM115 - closed below
            err = open(sb / "_condor_stderr", "wb")  # noqa: SIM115
            started = time.time()
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [str(sb / "bootstrap.sh")],
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
        report = sb / "pixicache-report.json"
        if report.is_file():
            with contextlib.suppress(ValueError, OSError):
                data = json.loads(report.read_text())
                run.agent_time_to_task = data.get("time_to_task")
                run.tiers = data.get("tiers") or {}
                run.error = data.get("error")
                run.installer_notes = list((data.get("installer") or {}).get("notes") or [])
        run.stdout_tail = _tail(sb / "_condor_stdout", 12)
        run.stderr_tail = _tail(sb / "_condor_stderr", 12)
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


# -- faults ----------------------------------------------------------------------------------


def _throttle_largest(pool: Pool, seconds: float) -> str:
    """Make the upstream stream the largest archive over ``seconds`` (once); its path."""
    sub, name, _, size = pool.wl.largest()
    path = f"/{CHANNEL}/{sub}/{name}"
    pool.upstream.fault(path, "slow", rate=max(1.0, size / seconds), times=1)
    return path


def _partial_started(store: Path) -> bool:
    part = store / "partial"
    try:
        return any(p.stat().st_size > 0 for p in part.iterdir())
    except OSError:
        return False


def _wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def mirror_restart_controller(notes: list[str]) -> Callable[[Pool, _Scheduler, list[JobRun]], None]:
    """SIGKILL the site mirror while a fill streams, then start it again at once."""

    def control(pool: Pool, sched: _Scheduler, runs: list[JobRun]) -> None:
        assert pool.mirror is not None
        if not _wait_for(lambda: _partial_started(pool.mirror.cache_dir), 300):  # type: ignore[union-attr]
            notes.append("mirror-restart: no fill was seen in progress; the mirror was not killed")
            return
        down = pool.mirror.restart()
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
            if "bootstrap: running:" in out and _partial_started(pool.node_store(node)):
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
    extracted = store / "pkgs" / entry
    expected: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        paths = json.loads((extracted / "info" / "paths.json").read_text())["paths"]
        expected = {p["_path"]: p["sha256"] for p in paths if p.get("sha256")}
    shutil.rmtree(extracted, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (store / "pkgs" / ".pixicache-snapshots" / f"{entry}.json").unlink()
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


# -- the run ---------------------------------------------------------------------------------


def _pixicache(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pixicache", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, **(env or {})),
    )


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
        wl = workload or prepare_workload(work / "upstream", cfg.scale, cfg.seed)
        log(
            f"workload: {len(wl.packages)} packages, {_human(wl.env_bytes)} (scale {cfg.scale}) "
            f"ready in {time.monotonic() - t:.1f} s"
        )
        bundle = _bundle(cfg, work)
        log(f"agent: {bundle.path} ({_human(bundle.size)}, sha256 {bundle.sha256[:16]}...)")
        pool = Pool(cfg, work, wl, bundle)
        result = PoolResult(cfg, wl.env_bytes, len(wl.packages), {}, bundle_sha256=bundle.sha256)
        try:
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
    from pixicache.bundle import BundleInfo, build_bundle

    if cfg.bundle is not None:
        path = Path(cfg.bundle)
        h = hashlib.sha256(path.read_bytes()).hexdigest()
        return BundleInfo(path=path, sha256=h, size=path.stat().st_size)
    return build_bundle(work / "pixicache.pyz", source="installed", compresslevel=1)


def _run_phases(pool: Pool, result: PoolResult) -> None:
    cfg = pool.cfg
    faults = set(cfg.faults)
    n = len(pool.wl.packages)
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
            size = {f"/{CHANNEL}/{sub}/{name}": sz for sub, name, _, sz in pool.wl.packages}
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
        # Each node fetched each artifact at most once (an evicted run's own fills are
        # not in a report), and its store ends up holding all of them.
        fills = cold.per_node(cfg.nodes)
        bad_nodes = [i for i, blobs in cold.node_blobs.items() if fills[i][0] > n or blobs != n]
        result.check("cold: each node store filled once", not bad_nodes, f"nodes {bad_nodes}")
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


# -- output ----------------------------------------------------------------------------------


def _fmt(v: float | None, unit: str = "s") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def markdown_report(result: PoolResult) -> str:
    """The results as markdown: a table per phase, then the checks."""
    cfg = result.config
    env = result.env_bytes
    lines = [
        f"Pool: {cfg.nodes} nodes x {cfg.slots} slots, {cfg.jobs} jobs; workload scale {cfg.scale}: "
        f"{result.artifacts} packages, {_human(env)}"
        + (f"; faults: {', '.join(cfg.faults)}" if cfg.faults else "")
        + ("; node-local serve" if cfg.node_serve else "")
        + ("; squid in front of the site mirror" if cfg.squid else ""),
        "",
        "| phase | runs | exit 0 | upstream ÷ env | site mirror ÷ env | node fills (min-max) "
        "| node-store hits (min-max) | time-to-task p50 | p95 | max | agent ttt p50 | CPU/job p50 | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ph in result.phases.items():
        per = ph.per_node(cfg.nodes)
        used = sorted({r.node for r in ph.runs})
        fills = [per[i][0] for i in used] or [0]
        hits = [per[i][1] for i in used] or [0]
        ttt = ph.ttt()
        agent = [r.agent_time_to_task for r in ph.runs if r.agent_time_to_task is not None]
        cpu = [r.cpu for r in ph.runs]
        mirror = "-" if name == "baseline" else f"{ph.mirror_bytes / env:.2f}x"
        lines.append(
            f"| {name} | {len(ph.runs)} | {ph.ok} | {ph.upstream_bytes / env:.2f}x | {mirror} "
            f"| {min(fills)}-{max(fills)} | {min(hits)}-{max(hits)} "
            f"| {_fmt(percentile(ttt, 50))} | {_fmt(percentile(ttt, 95))} | {_fmt(max(ttt) if ttt else None)} "
            f"| {_fmt(percentile(agent, 50))} | {_fmt(percentile(cpu, 50))} | {ph.seconds:.1f}s |"
        )
    wn, single = result.phases.get("warm-nodes"), result.phases.get("single")
    if wn is not None and single is not None and wn.ttt() and single.ttt():
        ratio = percentile(wn.ttt(), 50) / percentile(single.ttt(), 50)  # type: ignore[operator]
        cpu_ratio = percentile([r.cpu for r in wn.runs], 50) / max(  # type: ignore[operator]
            1e-9, percentile([r.cpu for r in single.runs], 50) or 0
        )
        lines += [
            "",
            f"Warm nodes vs a single warm-node run: time-to-task p50 {ratio:.2f}x, "
            f"CPU per job p50 {cpu_ratio:.2f}x ({cfg.nodes * cfg.slots} slots share "
            f"{os.cpu_count()} CPU cores here).",
        ]
    for name, ph in result.phases.items():
        if ph.squid:
            lines += [
                "",
                f"squid ({name}): package requests by result {ph.squid}; the site mirror's "
                f"artifact requests {ph.mirror_requests}",
            ]
    notes = [n for ph in result.phases.values() for n in ph.notes] + result.notes
    for name, ph in result.phases.items():
        direct = ph.upstream_bytes - ph.upstream_via_mirror
        fell = sum(1 for r in ph.runs if r.tier("upstream"))
        if name != "baseline" and (direct or ph.mirror_refused):
            notes.append(
                f"{name}: the site mirror refused {ph.mirror_refused} request(s); {fell} job(s) "
                f"fetched {direct / env:.2f}x the environment from upstream directly"
            )
        failed = [r for r in ph.runs if r.rc != 0 and not r.evicted]
        for r in failed[:3]:
            why = (r.error or {}).get("message") or r.stderr_tail.strip().splitlines()[-1:] or "?"
            notes.append(f"{name}: job {r.job} on node {r.node} exit {r.rc}: {str(why)[:300]}")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    lines += ["", "Checks:"] + [
        f"- [{'x' if ok else ' '}] {name}" + (f" ({detail})" if detail else "")
        for name, ok, detail in result.checks
    ]
    return "\n".join(lines) + "\n"


def plot(result: PoolResult, path: Path) -> Path | None:
    """A PNG: bytes per phase (upstream, site mirror) and the time-to-task distributions."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no figure", file=sys.stderr)
        return None
    env = result.env_bytes
    names = list(result.phases)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    xs = range(len(names))
    up = [result.phases[n].upstream_bytes / env for n in names]
    mir = [result.phases[n].mirror_bytes / env if n != "baseline" else 0 for n in names]
    ax1.bar([x - 0.2 for x in xs], up, 0.4, label="upstream ÷ env")
    ax1.bar([x + 0.2 for x in xs], mir, 0.4, label="site mirror ÷ env")
    for x, v in zip(xs, up):
        ax1.annotate(f"{v:.2f}", (x - 0.2, v), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(list(xs), names, rotation=20)
    ax1.set_ylabel("bytes ÷ environment bytes")
    ax1.set_yscale("symlog", linthresh=1)
    ax1.set_title("Bytes moved per phase")
    ax1.legend()
    data = [result.phases[n].ttt() or [0.0] for n in names]
    ax2.boxplot(data, whis=(5, 95), showfliers=True)
    ax2.set_xticks([x + 1 for x in xs], names, rotation=20)
    ax2.set_ylabel("time-to-task (s): job start -> task start")
    ax2.set_title("Time-to-task (whiskers p5-p95)")
    cfg = result.config
    fig.suptitle(
        f"pixicache pool: {cfg.nodes} nodes x {cfg.slots} slots, {cfg.jobs} jobs, "
        f"scale {cfg.scale} ({_human(env)})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(
        prog="benchmarks/pool.py", description=__doc__, formatter_class=Formatter
    )
    parser.add_argument("--nodes", type=int, default=10, help="execute nodes (M)")
    parser.add_argument("--slots", type=int, default=4, help="slots per node (K)")
    parser.add_argument("--jobs", type=int, default=100, help="jobs per phase (N)")
    parser.add_argument(
        "--scale", type=float, default=0.01, help="workload size factor (1.0 = 3.7 GB)"
    )
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated, from {', '.join(PHASES)}"
    )
    parser.add_argument(
        "--fault", action="append", default=[], choices=FAULTS, help="inject a fault (repeatable)"
    )
    parser.add_argument(
        "--node-serve", action="store_true", help="a node-local `pixicache serve` per node"
    )
    parser.add_argument(
        "--squid", action="store_true", help="squid (reverse proxy) in front of the site mirror"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to build everything (default: a temporary dir, deleted); "
        "a workload already there at the same scale and seed is reused",
    )
    parser.add_argument(
        "--bundle", type=Path, default=None, help="a built pixicache.pyz (default: build one)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("pool-results"), help="directory for pool.md/.png/.json"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the job sandboxes and the work dir"
    )
    parser.add_argument(
        "--job-timeout", type=float, default=900.0, help="seconds before a job is killed"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="run at most this many jobs at once (default: one per slot); on a machine with "
        "fewer cores than slots, = the core count keeps jobs from queueing for CPU",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    cfg = PoolConfig(
        nodes=args.nodes,
        slots=args.slots,
        jobs=args.jobs,
        scale=args.scale,
        seed=args.seed,
        phases=tuple(p.strip() for p in args.phases.split(",") if p.strip()),
        faults=tuple(args.fault),
        node_serve=args.node_serve,
        squid=args.squid,
        workdir=args.workdir,
        bundle=args.bundle,
        keep=args.keep,
        job_timeout=args.job_timeout,
        concurrency=args.concurrency,
        verbose=not args.quiet,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run_pool(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown_report(result)
    (args.out / "pool.md").write_text(text)
    (args.out / "pool.json").write_text(json.dumps(result.to_json(), indent=1))
    png = plot(result, args.out / "pool.png")
    print()
    print(text)
    print(
        f"written: {args.out / 'pool.md'}, {args.out / 'pool.json'}" + (f", {png}" if png else "")
    )
    return 0 if all(ok for _, ok, _ in result.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
