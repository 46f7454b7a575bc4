"""The servers of the simulated site: ``pixicache serve`` processes, squid, a small file system."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .common import CHANNEL, _tail, _wait_port, free_port


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
        "# squid in front of `pixicache serve`: generated by benchmarks/pool",
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
