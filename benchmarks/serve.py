#!/usr/bin/env python3
"""`pixicache serve` beside nginx and squid, measured the way a site runs them. Prints tables.

One run measures, for pixicache, nginx (``proxy_cache`` + ``proxy_cache_lock``) and squid
(``collapsed_forwarding``), each started cold and interleaved ``--repeat`` times (the
ratios are within a repetition; the table gives medians):

cold
    one blob (``--blob-size``, 1 GiB) pulled through each cache by one client: time to
    last byte (and straight from the upstream: ``direct``), and the CPU-seconds per GiB
    the cache's processes used;
herd
    ``--herd`` (32) clients at once ask a cold cache for one blob (``--herd-size``,
    256 MiB): time to first byte (median), the last client done, what upstream sent
    (requests, bytes) and whether every client got every byte right;
hits
    warm caches: one big blob to 8 connections (throughput, server CPU in cores) and the
    workload's artifacts (the GPU lock's 121 at ``--scale``) to 8 connections
    (requests/s), pixicache with ``--workers`` 1 and 2 beside nginx with 1 and 2 workers
    serving the same files from disk; the artifacts again with ``wrk`` as the client
    (C; one thread, then two). On a small machine the client's own CPU, shared with the
    server, can set the rate for every server alike: the table shows each client's CPU,
    and an aiohttp-only server (the "floor") as a check: a column in which it gets
    nginx's rate measured the client.

The upstream is nginx serving the files statically; its access log counts what it sent.
``--shaped RATE`` (root) puts it in a network namespace of its own behind a veth pair
shaped with ``tc tbf`` (``benchmarks/netshape.py``), so the caches pull through a
WAN-like link; without it, everything is on loopback. Clients are separate processes
with a lean HTTP/1.1 client (http.client, 1 MiB readinto), the same for every server.

    python benchmarks/serve.py --shaped 1gbit          # the acceptance run
    python benchmarks/serve.py                         # loopback
    python benchmarks/serve.py --quick                 # a small smoke run (~1 min)

Needs nginx and squid (``apt-get install nginx squid wrk``); a missing peer is a row
that says so, never a silently weaker comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

# -- the client (runs in its own process: `serve.py _client SPEC.json`) ------------------------


def client_main(spec_path: str) -> None:
    """Fetch ``spec["items"]`` ([url, sha256, size]) ``repeat`` times with ``threads``
    connections; print one JSON line (bytes, requests, failures, start, end)."""
    import http.client

    spec = json.loads(Path(spec_path).read_text())
    items: list[list[Any]] = spec["items"]
    threads = int(spec.get("threads", 1))
    repeat = int(spec.get("repeat", 1))
    verify = bool(spec.get("verify", False))
    rng = random.Random(spec.get("seed", 0))
    lanes: list[list[list[Any]]] = [[] for _ in range(threads)]
    for _ in range(repeat):
        order = list(items)
        rng.shuffle(order)
        for i, item in enumerate(order):
            lanes[i % threads].append(item)
    totals = {"bytes": 0, "requests": 0, "failures": []}
    lock = threading.Lock()
    first: list[float | None] = [None]  # when the first body byte arrived

    def lane(work: list[list[Any]]) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        nbytes = nreq = 0
        failures = []
        for url, sha, size in work:
            parts = urlsplit(url)
            conn = conns.get(parts.netloc)
            if conn is None:
                conn = conns[parts.netloc] = http.client.HTTPConnection(
                    parts.hostname, parts.port, timeout=900
                )
            try:
                conn.request("GET", parts.path, headers={"x-expected-sha256": sha} if sha else {})
                resp = conn.getresponse()
                h = hashlib.sha256() if verify else None
                n = 0
                while True:
                    k = resp.readinto(view)
                    if first[0] is None and k:
                        first[0] = time.time()
                    if not k:
                        break
                    if h is not None:
                        h.update(view[:k])
                    n += k
                ok = resp.status == 200 and n == size and (h is None or h.hexdigest() == sha)
                if not ok:
                    failures.append(f"{url}: status {resp.status}, {n} bytes")
                nbytes += n
                nreq += 1
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"{url}: {exc!r}")
                conn.close()
                conns.pop(parts.netloc, None)
        with lock:
            totals["bytes"] += nbytes
            totals["requests"] += nreq
            totals["failures"] += failures

    start_at = float(spec.get("start_at", 0))
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    t0 = time.time()
    workers = [threading.Thread(target=lane, args=(w,)) for w in lanes if w]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    totals["start"], totals["end"], totals["first_byte"] = t0, time.time(), first[0]
    print(json.dumps(totals), flush=True)


def run_clients(n: int, spec: dict[str, Any], work: Path, startup: float = 2.0) -> dict[str, Any]:
    """``n`` client processes started together; aggregate bytes, requests, seconds, failures."""
    spec = dict(spec, start_at=time.time() + startup + n * 0.05)
    procs = []
    for i in range(n):
        path = work / f"client-{i}.json"
        path.write_text(json.dumps(dict(spec, seed=i)))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), "_client", str(path)], stdout=subprocess.PIPE, text=True
            )
        )
    results = []
    for p in procs:
        out, _ = p.communicate()
        results.append(json.loads(out.strip().splitlines()[-1]))
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    firsts = sorted(r["first_byte"] - start for r in results if r.get("first_byte"))
    return {
        "bytes": sum(r["bytes"] for r in results),
        "requests": sum(r["requests"] for r in results),
        "seconds": end - start,
        "first_byte_p50": statistics.median(firsts) if firsts else None,
        "failures": [f for r in results for f in r["failures"]],
        "clients_ok": sum(1 for r in results if not r["failures"]),
    }


# -- processes and their CPU -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += _tree(int(child))
    except OSError:
        pass
    return out


def cpu_parts(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` and every process below it (threads included)."""
    user = system = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
    tck = os.sysconf("SC_CLK_TCK")
    return user / tck, system / tck


def children_cpu() -> float:
    """User + system CPU seconds of this process's children that have been waited for
    (the clients: each is waited for before the next measurement)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every process below it (threads included)."""
    return sum(cpu_parts(pid))


def settle_page_cache(work: Path, nbytes: int) -> None:
    """Write a file of ``nbytes`` and delete it, so that the next fill's page-cache
    allocations find freshly freed memory, whichever cache makes them.

    Why: on a virtual machine whose host takes back guest memory that has sat free for
    a few seconds (free page reporting, as on this build machine), the first touch of
    such memory costs the guest a host fault per page, billed as system time to
    whichever process touches it: ~1.2 CPU-s per GiB here, for a file write or an
    anonymous allocation alike. Without this step a cold fill's CPU figure carried that
    cost or not depending on what the machine had freed in the seconds before (the same
    cache measured 1.2 to 4.7 system CPU-s per GiB in one session). Every cache gets the
    same step before each fill; ``--no-settle`` measures without it.
    """
    if nbytes <= 0:
        return
    path = work / "settle.tmp"
    block = bytes(4 << 20)
    with open(path, "wb") as fh:
        for _ in range(0, nbytes, len(block)):
            fh.write(block)
    path.unlink()


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not start: {log.read_text()[-2000:] if log.exists() else ''}")


class Server:
    """A server process: its URL, its CPU, stop."""

    name = "?"

    def __init__(self, proc: subprocess.Popen[bytes], url: str) -> None:
        self.proc, self.url = proc, url

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def nginx_bin() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def squid_bin() -> str | None:
    return shutil.which("squid") or ("/usr/sbin/squid" if Path("/usr/sbin/squid").exists() else None)


def _nginx_conf(work: Path, name: str, workers: int, http_block: str) -> Path:
    temp = {k: work / f"{name}-{k}" for k in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf = work / f"{name}.conf"
    conf.write_text(
        f"""worker_processes {workers};
daemon off;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log;
events {{ worker_connections 4096; }}
http {{
    sendfile on; tcp_nopush on;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
{http_block}
}}
"""
    )
    return conf


def start_nginx_static(root: Path, work: Path, name: str, host: str, workers: int = 1,
                       popen: Any = subprocess.Popen, log_to: Path | None = None) -> Server:
    """nginx serving ``root`` (as the upstream, counting what it sent, or as the peer of hits)."""
    port = free_port()
    access = (
        f"log_format sent '$request_uri $status $body_bytes_sent'; access_log {log_to} sent;"
        if log_to else "access_log off;"
    )
    conf = _nginx_conf(work, name, workers, f"    {access}\n    server {{ listen {host}:{port}; root {root}; }}")
    proc = popen([nginx_bin(), "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_port(host, port, proc, name, work / f"{name}-error.log")
    s = Server(proc, f"http://{host}:{port}")
    s.name = f"nginx x{workers}"
    return s


def start_nginx_cache(upstream: str, work: Path, name: str) -> Server:
    port = free_port()
    cache = work / f"{name}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    block = f"""    access_log off;
    proxy_cache_path {cache} levels=1:2 keys_zone={name}:10m max_size=100g inactive=1d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache {name};
            proxy_cache_valid 200 1d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 3600s;
            proxy_cache_lock_age 3600s;
            proxy_read_timeout 600s;
        }}
    }}"""
    conf = _nginx_conf(work, name, 1, block)
    proc = subprocess.Popen([nginx_bin(), "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port, proc, name, work / f"{name}-error.log")
    s = Server(proc, f"http://127.0.0.1:{port}")
    s.name = "nginx proxy_cache"
    return s


def start_squid(upstream: str, work: Path, name: str) -> Server:
    up = urlsplit(upstream)
    port = free_port()
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    (d / "cache").mkdir(parents=True)
    conf = d / "squid.conf"
    conf.write_text(
        f"""http_port 127.0.0.1:{port} accel defaultsite={up.hostname} no-vhost
cache_peer {up.hostname} parent {up.port} 0 no-query originserver name=up
http_access allow all
cache_peer_access up allow all
collapsed_forwarding on
cache_dir ufs {d}/cache 100000 16 256
maximum_object_size 8 GB
cache_mem 64 MB
maximum_object_size_in_memory 1 MB
refresh_pattern . 1440 100% 10080 override-expire
pid_filename {d}/squid.pid
access_log none
cache_log {d}/cache.log
coredump_dir {d}
workers 1
shutdown_lifetime 1 seconds
"""
    )
    if os.geteuid() == 0:
        shutil.chown(d, "proxy", "proxy")
        for p in d.rglob("*"):
            shutil.chown(p, "proxy", "proxy")
    subprocess.run([squid_bin(), "-z", "-N", "-f", str(conf)], capture_output=True, timeout=120)
    proc = subprocess.Popen([squid_bin(), "-N", "-f", str(conf)], stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port, proc, name, d / "cache.log")
    s = Server(proc, f"http://127.0.0.1:{port}")
    s.name = "squid"
    return s


def start_aiohttp_floor(root: Path, work: Path) -> Server:
    """``benchmarks/aiohttp_floor.py`` serving ``root`` (see its docstring)."""
    port = free_port()
    log = work / "aiohttp-floor.log"
    proc = subprocess.Popen(
        [sys.executable, str(HERE.parent / "aiohttp_floor.py"), str(root), str(port)],
        stderr=open(log, "w"),  # noqa: SIM115 - the child owns it
    )
    wait_port("127.0.0.1", port, proc, "aiohttp floor", log)
    s = Server(proc, f"http://127.0.0.1:{port}")
    s.name = "aiohttp floor"
    return s


def start_pixicache(upstream: str, work: Path, name: str, workers: int = 1,
                    env: dict[str, str] | None = None) -> Server:
    """``pixicache serve`` pulling through ``upstream`` (``env``: its environment, if not ours)."""
    log = work / f"{name}.log"
    store = work / f"{name}-store"
    shutil.rmtree(store, ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixicache", "serve", "--port", "0", "--cache-dir", str(store),
         "--only-upstreams", "--upstream", f"conda-forge={upstream}/conda-forge", "--quiet",
         "--per-client", "0", "--max-connections", "10000", "--workers", str(workers)],
        stderr=open(log, "w"),  # noqa: SIM115 - the child owns it
        env=env,
    )  # fmt: skip
    deadline = time.time() + 30
    url = ""
    while not url:
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError(f"pixicache serve did not start:\n{log.read_text()}")
        for line in log.read_text().splitlines():
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].split()[0]
        time.sleep(0.05)
    s = Server(proc, url)
    s.name = f"pixicache x{workers}" if workers > 1 else "pixicache"
    return s


@contextlib.contextmanager
def upstream_at(root: Path, work: Path, shaped: str | None) -> Iterator[tuple[Server, Path, str]]:
    """nginx serving ``root`` as the upstream, on loopback or behind a shaped link;
    yields (server, its access log, a description)."""
    log = work / "upstream-access.log"
    log.unlink(missing_ok=True)
    if not shaped:
        up = start_nginx_static(root, work, "upstream", "127.0.0.1", log_to=log)
        try:
            yield up, log, "loopback"
        finally:
            up.stop()
        return
    from netshape import ShapedLink

    with ShapedLink(shaped) as link:
        up = start_nginx_static(root, work, "upstream", link.upstream_ip, popen=link.popen, log_to=log)
        try:
            yield up, log, f"a {shaped} link (veth + tc tbf, its own network namespace)"
        finally:
            up.stop()


def upstream_sent(log: Path) -> tuple[int, int]:
    """(requests, body bytes) in the upstream's access log so far."""
    n = b = 0
    with contextlib.suppress(FileNotFoundError):
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2].isdigit():
                n += 1
                b += int(parts[2])
    return n, b


# -- the measurements --------------------------------------------------------------------------

PEERS = ("pixicache", "nginx proxy_cache", "squid")


def start_peer(kind: str, upstream: str, work: Path, tag: str) -> Server | str:
    """A cold cache of ``kind`` in front of ``upstream``, or why it cannot run here."""
    if kind == "pixicache":
        return start_pixicache(upstream, work, f"px-{tag}")
    if kind == "nginx proxy_cache":
        return start_nginx_cache(upstream, work, f"ngc_{tag}") if nginx_bin() else "nginx is not installed"
    return start_squid(upstream, work, f"squid-{tag}") if squid_bin() else "squid is not installed"


def fetch_once(url: str, sha: str, size: int, work: Path) -> dict[str, Any]:
    r = run_clients(1, {"items": [[url, sha, size]], "verify": False}, work, startup=0.3)
    if r["failures"]:
        raise RuntimeError(f"{url}: {r['failures'][:3]}")
    return r


def measure_cold(up: Server, rel: str, sha: str, size: int, work: Path, repeat: int, settle: int) -> dict[str, list[float]]:
    """Per kind: time to last byte and CPU-s/GiB (user, system), one cold cache per
    repetition; :func:`settle_page_cache` (``settle`` bytes) before each fill."""
    out: dict[str, list[float]] = {"direct": []}
    gib = size / (1 << 30)
    for rep in range(repeat):
        settle_page_cache(work, settle)
        out["direct"].append(fetch_once(f"{up.url}/{rel}", sha, size, work)["seconds"])
        for kind in PEERS:
            srv = start_peer(kind, up.url, work, f"cold{rep}")
            if isinstance(srv, str):
                out.setdefault(f"{kind} missing", []).append(0.0)
                continue
            try:
                settle_page_cache(work, settle)
                u0, s0 = cpu_parts(srv.proc.pid)
                r = fetch_once(f"{srv.url}/{rel}", sha, size, work)
                time.sleep(0.5)  # a cache finishing its write after the last byte
                u1, s1 = cpu_parts(srv.proc.pid)
                out.setdefault(f"{kind} time", []).append(r["seconds"])
                out.setdefault(f"{kind} cpu", []).append((u1 - u0 + s1 - s0) / gib)
                out.setdefault(f"{kind} user", []).append((u1 - u0) / gib)
                out.setdefault(f"{kind} sys", []).append((s1 - s0) / gib)
            finally:
                srv.stop()
    return out


def measure_herd(up: Server, log: Path, rel: str, sha: str, size: int, work: Path, clients: int, repeat: int, settle: int) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for rep in range(repeat):
        for kind in PEERS:
            srv = start_peer(kind, up.url, work, f"herd{rep}")
            if isinstance(srv, str):
                continue
            try:
                settle_page_cache(work, settle)
                n0, b0 = upstream_sent(log)
                r = run_clients(clients, {"items": [[f"{srv.url}/{rel}", sha, size]], "verify": True}, work, startup=1.0)
                time.sleep(0.5)
                n1, b1 = upstream_sent(log)
                out.setdefault(f"{kind} ttfb", []).append(r["first_byte_p50"])
                out.setdefault(f"{kind} last", []).append(r["seconds"])
                out.setdefault(f"{kind} upstream", []).append((n1 - n0, b1 - b0))
                out.setdefault(f"{kind} ok", []).append(r["clients_ok"])
            finally:
                srv.stop()
    return out


def measure_hits(root: Path, up: Server, items: list[list[Any]], big: list[Any], work: Path, repeat: int) -> dict[str, list[float]]:
    """Warm servers: the big blob to 8 connections (GB/s, server cores) and the artifacts
    to 8 connections (requests/s); pixicache x1, x2 and nginx x1, x2. Warm means: the
    caches were filled, and then every server (the peers too) answered every artifact
    once (a mirror that has run for a while has)."""
    out: dict[str, list[float]] = {}
    servers: list[Server] = []
    try:
        for workers in (1, 2):
            px = start_pixicache(up.url, work, f"px-hits{workers}", workers)
            warm = [[it[0].replace("{base}", px.url), it[1], it[2]] for it in [*items, big]]
            r = run_clients(4, {"items": warm, "threads": 4}, work, startup=0.5)  # fills every blob
            if r["failures"]:
                raise RuntimeError(f"warming pixicache: {r['failures'][:3]}")
            servers.append(px)
            servers.append(start_nginx_static(root, work, f"ng-hits{workers}", "127.0.0.1", workers))
        servers.append(start_aiohttp_floor(root, work))
        for srv in servers:  # every server answers every artifact once before it is measured
            at = [[it[0].replace("{base}", srv.url), it[1], it[2]] for it in [*items, big]]
            r = run_clients(1, {"items": at, "threads": 4}, work, startup=0.3)
            if r["failures"]:
                raise RuntimeError(f"warming {srv.name}: {r['failures'][:3]}")
        for rep in range(repeat):
            # the order turns round every other repetition, so a machine getting slower or
            # faster during a repetition does not always favour the same server
            for srv in servers if rep % 2 == 0 else servers[::-1]:
                at = [[it[0].replace("{base}", srv.url), it[1], it[2]] for it in items]
                big_at = [[big[0].replace("{base}", srv.url), big[1], big[2]]]
                c0 = srv.cpu()
                r = run_clients(1, {"items": big_at, "threads": 8, "repeat": 8}, work, startup=0.3)
                out.setdefault(f"{srv.name} big GB/s", []).append(r["bytes"] / r["seconds"] / 1e9)
                out.setdefault(f"{srv.name} big cores", []).append((srv.cpu() - c0) / r["seconds"])
                c0, k0 = srv.cpu(), children_cpu()
                r = run_clients(1, {"items": at, "threads": 8, "repeat": HITS_ROUNDS}, work, startup=0.3)
                out.setdefault(f"{srv.name} small req/s", []).append(r["requests"] / r["seconds"])
                out.setdefault(f"{srv.name} small ms/req", []).append((srv.cpu() - c0) / r["requests"] * 1000)
                # the client process's own CPU, its start-up included: an upper bound
                out.setdefault(f"{srv.name} small client cores", []).append((children_cpu() - k0) / r["seconds"])
                if shutil.which("wrk"):
                    for threads, key in ((1, "wrk"), (2, "wrk2")):
                        c0, k0 = srv.cpu(), children_cpu()
                        rate = wrk_rate(srv.url, items, work, threads)
                        n = rate * WRK_SECONDS
                        out.setdefault(f"{srv.name} {key} req/s", []).append(rate)
                        out.setdefault(f"{srv.name} {key} ms/req", []).append((srv.cpu() - c0) / n * 1000)
                        out.setdefault(f"{srv.name} {key} client cores", []).append((children_cpu() - k0) / WRK_SECONDS)
    finally:
        for srv in servers:
            srv.stop()
    return out


WRK_SECONDS = 4

HITS_ROUNDS = 15
"""Times the Python client asks for every artifact in one measurement (121 x 15 requests,
about 2 s here): shorter ones (it was 5) made a repetition's ratio swing by +-15 % with
what else the machine did in that second."""


def wrk_rate(base: str, items: list[list[Any]], work: Path, threads: int = 1) -> float:
    """Requests/s of ``wrk`` (``threads`` threads, 8 connections, :data:`WRK_SECONDS`)
    asking for the artifacts in turn: a client in C that costs the shared CPU less than
    the Python client. It reads and discards bodies (the Python client's columns count
    complete ones). With one thread it is itself the limit on this machine (its thread
    is busy the whole time); with two it can use both cores, so the limit is what server
    and client together cost the machine per request."""
    script = work / "wrk-paths.lua"
    paths = ",".join(json.dumps(urlsplit(it[0].replace("{base}", "http://x")).path) for it in items)
    script.write_text(
        f"paths = {{{paths}}}\ni = 0\n"
        "request = function()\n  i = i % #paths + 1\n  return wrk.format('GET', paths[i])\nend\n"
    )
    out = subprocess.run(
        ["wrk", f"-t{threads}", "-c8", f"-d{WRK_SECONDS}s", "-s", str(script), base],
        capture_output=True, text=True, check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(f"wrk printed no rate:\n{out}")


def world_readable(root: Path) -> None:
    """Make the tree at ``root`` readable by nginx's and squid's workers (other users)."""
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def hit_items(wl: Any) -> list[list[Any]]:
    """The workload's artifacts as ``[url with {base} for the server, sha256, size]``."""
    return [[a.url.replace("https://conda.anaconda.org", "{base}"), a.sha256, a.size] for a in wl.artifacts]


def med(values: list[Any]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio_of(a: list[float], b: list[float]) -> float:
    """The median of the per-repetition ratios a/b."""
    return statistics.median([x / y for x, y in zip(a, b) if y]) if a and b else float("nan")


def ratio_cell(a: list[float], b: list[float]) -> str:
    """``ratio_of(a, b)``, and the lowest and highest per-repetition ratio when there
    are several: how much of a difference is the machine's noise."""
    ratios = [x / y for x, y in zip(a, b) if y]
    if len(ratios) < 2:
        return f"{ratio_of(a, b):.2f}x"
    return f"{ratio_of(a, b):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def report(cold: dict[str, Any], herd: dict[str, Any], hits: dict[str, Any], *, blob: int, herd_size: int, clients: int, artifacts: int, link: str, sha_s: float, settle: int) -> str:
    lines = [f"upstream: nginx (static) over {link}; medians of the repetitions, ratios within each", ""]
    if cold.get("direct"):
        lines += _cold_rows(cold, blob, sha_s, settle)
    if herd:
        lines += _herd_rows(herd, herd_size, clients)
    if hits:
        lines += _hits_rows(hits, blob, artifacts)
    return "\n".join(lines)


def _cold_rows(cold: dict[str, Any], blob: int, sha_s: float, settle: int) -> list[str]:
    lines = [
        f"### cold pull-through of {blob / 2**20:.0f} MiB, one client",
        "",
        "| | time to last byte | ÷ direct | cache CPU-s per GiB (user / system) | ÷ nginx proxy_cache |",
        "|---|---|---|---|---|",
        f"| direct from upstream | {med(cold['direct']):.2f} s | 1.00x | - | - |",
    ]
    for kind in PEERS:
        if f"{kind} missing" in cold:
            lines.append(f"| {kind} | not run: {kind.split()[0]} is not installed | | | |")
            continue
        t, c = cold[f"{kind} time"], cold[f"{kind} cpu"]
        vs = ratio_of(c, cold.get("nginx proxy_cache cpu", []))
        lines.append(
            f"| {kind} | {med(t):.2f} s | {ratio_of(t, cold['direct']):.2f}x | {med(c):.2f} "
            f"({med(cold[f'{kind} user']):.2f} / {med(cold[f'{kind} sys']):.2f}) | {vs:.2f}x |"
        )
    lines.append(f"| (one SHA-256 pass over the blob on this CPU) | | | {sha_s:.2f} | |")
    lines += ["", f"(before each fill, every cache alike: {settle_note(settle)})"]
    return [*lines, ""]


def settle_note(settle: int) -> str:
    if not settle:
        return "nothing (--no-settle): a fill's system time includes whatever first touch of host-reclaimed memory costs this machine at that moment"
    return f"{settle / 2**20:.0f} MiB written and deleted, so its page-cache pages are freshly freed memory (settle_page_cache)"


def _herd_rows(herd: dict[str, Any], herd_size: int, clients: int) -> list[str]:
    lines = [
        f"### herd: {clients} clients at once, one cold {herd_size / 2**20:.0f} MiB blob",
        "",
        "| | first byte (median) | last client done | upstream requests / bytes | clients with every byte right |",
        "|---|---|---|---|---|",
    ]
    for kind in PEERS:
        if f"{kind} last" not in herd:
            lines.append(f"| {kind} | not run | | | |")
            continue
        ups = herd[f"{kind} upstream"]
        ttfb = [x for x in herd[f"{kind} ttfb"] if x is not None]
        lines.append(
            f"| {kind} | {med(ttfb):.2f} s | {med(herd[f'{kind} last']):.2f} s | "
            f"{max(u[0] for u in ups)} / {max(u[1] for u in ups) / herd_size:.2f}x the blob "
            f"(worst repetition) | {min(herd[f'{kind} ok'])}/{clients} |"
        )
    return [*lines, ""]


def _hits_rows(hits: dict[str, Any], blob: int, artifacts: int) -> list[str]:
    rows = [("pixicache", "nginx x1"), ("nginx x1", None), ("aiohttp floor", "nginx x1"),
            ("pixicache x2", "nginx x2"), ("nginx x2", None)]
    rows = [(name, ng) for name, ng in rows if hits.get(f"{name} small req/s")]
    lines = [
        f"### hits (warm): one {blob / 2**20:.0f} MiB blob x 8 connections; {artifacts} artifacts x 8 connections",
        "",
        "| server | big blob GB/s | server CPU (cores) | artifacts req/s (Python client) | server CPU ms per request "
        "| client CPU (cores) | req/s ÷ nginx, same workers (lowest-highest repetition) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ng in rows:
        rq = hits[f"{name} small req/s"]
        lines.append(
            f"| {name} | {med(hits.get(f'{name} big GB/s', [])):.2f} | "
            f"{med(hits.get(f'{name} big cores', [])):.2f} | {med(rq):.0f} | "
            f"{med(hits.get(f'{name} small ms/req', [])):.2f} | "
            f"{med(hits.get(f'{name} small client cores', [])):.2f} | "
            + (f"{ratio_cell(rq, hits.get(f'{ng} small req/s', []))} |" if ng else "1.00x |")
        )
    lines.append("")
    if not any(k.endswith("wrk req/s") for k in hits):
        lines.append("(wrk: not installed here, so no wrk table: `apt-get install wrk`.)")
    else:
        lines += [
            "| server | wrk 1 thread: req/s | server CPU ms per request | wrk's CPU (cores) | ÷ nginx "
            "| wrk 2 threads: req/s | server CPU ms per request | wrk's CPU (cores) | ÷ nginx |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, ng in rows:
            lines.append(f"| {name} |" + _wrk_cells(hits, name, ng, "wrk") + _wrk_cells(hits, name, ng, "wrk2"))
        lines.append("")
    lines.append(
        "(aiohttp floor: `benchmarks/aiohttp_floor.py`, aiohttp's low-level server with a "
        "handler that only opens the file and sends it: the least a server built on "
        "aiohttp, as pixicache is, costs per request. Where it gets nginx's rate, the "
        "client, not the server, set the rate of that column.)"
    )
    return lines


def _wrk_cells(hits: dict[str, Any], name: str, ng: str | None, key: str) -> str:
    rq = hits.get(f"{name} {key} req/s", [])
    if not rq:
        return " - | - | - | - |"
    ratio = ratio_cell(rq, hits.get(f"{ng} {key} req/s", [])) if ng else "1.00x"
    return (
        f" {med(rq):.0f} | {med(hits.get(f'{name} {key} ms/req', [])):.2f} | "
        f"{med(hits.get(f'{name} {key} client cores', [])):.2f} | {ratio} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=None, help="the artifacts' size (default 0.1)")
    parser.add_argument("--blob-size", type=int, default=None, help="bytes of the cold blob (1 GiB)")
    parser.add_argument("--herd-size", type=int, default=None, help="bytes of the herd's blob (256 MiB)")
    parser.add_argument("--herd", type=int, default=None, help="herd clients (32)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (3)")
    parser.add_argument("--shaped", metavar="RATE", default=None, help="the upstream behind a tbf-shaped link, e.g. 1gbit (root)")
    parser.add_argument("--only", default="cold,herd,hits", help="which sections (cold,herd,hits)")
    parser.add_argument("--quick", action="store_true", help="a small run (128 MiB, scale 0.02, 8 clients, 1 repetition)")
    parser.add_argument("--no-settle", action="store_true", help="no settle_page_cache step before cold fills and herds")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (0.02 if args.quick else 0.1)
    blob = args.blob_size or ((128 << 20) if args.quick else (1 << 30))
    herd_size = args.herd_size or ((64 << 20) if args.quick else (256 << 20))
    clients = args.herd or (8 if args.quick else 32)
    repeat = 1 if args.quick else max(1, args.repeat)
    sections = set(args.only.split(","))
    if args.shaped:
        from netshape import shaping_available

        why = shaping_available()
        if why:
            raise SystemExit(f"--shaped: {why}")

    from pixicache.testing import make_blob_workload
    from pixicache.testing.workload import write_random_file

    work = args.work or Path(tempfile.mkdtemp(prefix="pixicache-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # nginx (www-data) and squid (proxy) workers read and write below it
    try:
        wl = make_blob_workload(work / "upstream", scale=scale, seed=1)
        big_rel = "conda-forge/linux-64/bench-big-1.0-0.conda"
        herd_rel = "conda-forge/linux-64/bench-herd-1.0-0.conda"
        big_sha, _ = write_random_file(wl.root / big_rel, blob, seed=2, key="big")
        herd_sha, _ = write_random_file(wl.root / herd_rel, herd_size, seed=3, key="herd")
        world_readable(wl.root)
        t0 = time.perf_counter()
        with open(wl.root / big_rel, "rb") as fh:
            hashlib.file_digest(fh, "sha256")
        sha_s = (time.perf_counter() - t0) / (blob / (1 << 30))
        items = hit_items(wl)
        big_item = ["{base}/" + big_rel, big_sha, blob]
        cold = herd = hits = {}
        settle = 0 if args.no_settle else blob * 3 // 2
        with upstream_at(wl.root, work, args.shaped) as (up, log, link):
            if "cold" in sections:
                cold = measure_cold(up, big_rel, big_sha, blob, work, repeat, settle)
            if "herd" in sections:
                herd = measure_herd(up, log, herd_rel, herd_sha, herd_size, work, clients, repeat,
                                    0 if args.no_settle else herd_size * 3 // 2)
            if "hits" in sections:
                hits = measure_hits(wl.root, up, items, big_item, work, repeat)
        print(report(cold or {"direct": []}, herd, hits, blob=blob, herd_size=herd_size, clients=clients,
                     artifacts=len(items), link=link, sha_s=sha_s, settle=settle))
        print(f"\n(python benchmarks/serve.py {' '.join(argv if argv is not None else sys.argv[1:])}; "
              f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d')})")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_client":
        client_main(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
