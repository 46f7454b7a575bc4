#!/usr/bin/env python3
"""Benchmark `pixicache serve` on loopback (issue 3 acceptance). Prints a markdown table.

Measured in one run, against the size-faithful synthetic workload of the shared
GPU lock (121 artifacts, 3.71 GB at --scale 1.0) served by pixicache's counting
test server as "conda-forge":

(a) hits: throughput of one --blob-size blob (1 GiB) to 1, 8 and 32 concurrent
    clients, and requests/s for the 121 artifacts (8 clients), pixicache vs
    nginx (Debian) serving the same files from disk (goal >= 0.8x nginx);
(b) cold pull-through of the blob: time to last byte through a cold serve vs
    straight from the upstream server (goal <= 1.1x);
(c) thundering herd: --herd (100) client processes fetch the whole workload
    through /conda-forge/... of a cold serve: upstream requests must equal the
    distinct artifacts, upstream bytes the lock's bytes, every client must get
    every digest right; and the serve's peak RSS (VmHWM, goal < 200 MB).

The server runs as its own process (`python -m pixicache.serve`), as in
production; clients are separate processes with a lean HTTP/1.1 client
(http.client, 1 MiB readinto), the same for pixicache and nginx.

    python benchmarks/serve.py --scale 1.0            # the acceptance run
    python benchmarks/serve.py --quick                # a small smoke run (~1 min)
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve()


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
    totals["start"], totals["end"] = t0, time.time()
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
    return {
        "bytes": sum(r["bytes"] for r in results),
        "requests": sum(r["requests"] for r in results),
        "seconds": end - start,
        "failures": [f for r in results for f in r["failures"]],
        "clients_ok": sum(1 for r in results if not r["failures"]),
    }


# -- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """`python -m pixicache.serve` as a child process."""

    def __init__(self, cache_dir: Path, upstream_url: str, work: Path, name: str) -> None:
        self.log = work / f"{name}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pixicache.serve",
                "--port",
                "0",
                "--cache-dir",
                str(cache_dir),
                "--upstream",
                f"conda-forge={upstream_url}",
                "--quiet",
                "--per-client",
                "0",
                "--max-connections",
                "10000",
            ],
            stderr=open(self.log, "w"),  # noqa: SIM115 - the child owns it
        )
        deadline = time.time() + 30
        self.url = ""
        while not self.url:
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"serve did not start:\n{self.log.read_text()}")
            for line in self.log.read_text().splitlines():
                if "listening on " in line:
                    self.url = line.split("listening on ", 1)[1].split()[0]
            time.sleep(0.05)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def idle(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if httpx.get(self.url + "/admin/fills", timeout=30).json() == []:
                return
            time.sleep(0.05)
        raise TimeoutError("fills still running")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the serve process has used (its threads included)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def gc_all(self) -> None:
        import httpx

        httpx.post(self.url + "/admin/gc?max_size=0", timeout=600).raise_for_status()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def start_nginx(root: Path, work: Path, workers: str) -> tuple[subprocess.Popen[bytes] | None, str]:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if not nginx:
        return None, "nginx not found (apt-get install -y nginx)"
    port = free_port()
    conf = work / "nginx.conf"
    temp = {k: work / f"nginx-{k}" for k in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf.write_text(
        f"""
worker_processes {workers};
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on; tcp_nopush on;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""
    )
    proc = subprocess.Popen([nginx, "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    return None, f"nginx did not start (see {work}/nginx-error.log)"


# -- the measurements --------------------------------------------------------------------------


def gbps(result: dict[str, Any]) -> float:
    return result["bytes"] / result["seconds"] / 1e9


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", type=float, default=None, help="workload scale (default 1.0; --quick: 0.02)"
    )
    parser.add_argument(
        "--blob-size", type=int, default=None, help="bytes of the big blob (default 1 GiB)"
    )
    parser.add_argument(
        "--herd", type=int, default=None, help="client processes for (c) (default 100)"
    )
    parser.add_argument(
        "--herd-threads", type=int, default=2, help="connections per herd client (2)"
    )
    parser.add_argument("--clients", default=None, help="client counts for (a), e.g. 1,8,32")
    parser.add_argument(
        "--nginx-workers", default="1", help="nginx worker_processes (1: one process, like serve)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small, fast run (scale 0.02, 128 MiB, 20 clients)"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="work directory (default: a temp dir, removed)"
    )
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (0.02 if args.quick else 1.0)
    blob_size = args.blob_size or ((128 << 20) if args.quick else (1 << 30))
    herd = args.herd or (20 if args.quick else 100)
    client_counts = [
        int(c) for c in (args.clients or ("1,8" if args.quick else "1,8,32")).split(",")
    ]

    from pixicache.testing import UpstreamServer, make_blob_workload
    from pixicache.testing.workload import write_random_file

    work = args.work or Path(tempfile.mkdtemp(prefix="pixicache-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # nginx workers (www-data/nobody) must read the files
    rows: list[tuple[str, str, str, str, str]] = []
    notes: list[str] = []
    try:
        t0 = time.time()
        wl = make_blob_workload(work / "upstream", scale=scale, seed=1)
        big_rel = "conda-forge/linux-64/bench-big-1.0-0.conda"
        big_sha, _ = write_random_file(wl.root / big_rel, blob_size, seed=2, key="big")
        print(
            f"workload: {len(wl.artifacts)} artifacts, {wl.total_bytes / 1e9:.2f} GB (scale {scale}); "
            f"blob {blob_size / 2**20:.0f} MiB; made in {time.time() - t0:.1f} s",
            file=sys.stderr,
        )
        items = [
            [a.url.replace("https://conda.anaconda.org", "{base}"), a.sha256, a.size]
            for a in wl.artifacts
        ]

        def at(base: str) -> list[list[Any]]:
            return [[u.replace("{base}", base), s, n] for u, s, n in items]

        with UpstreamServer(wl.root, url_prefix="") as up:
            big_up = f"{up.url}/{big_rel}"

            # (b) cold pull-through vs direct --------------------------------------------
            serve = Serve(work / "store-cold", up.channel_url("conda-forge"), work, "serve-cold")
            try:
                direct, through, cpu = [], [], []
                for _ in range(3):
                    r = run_clients(1, {"items": [[big_up, big_sha, blob_size]]}, work, startup=0.3)
                    assert not r["failures"], r["failures"]
                    direct.append(r["seconds"])
                    serve.idle()
                    serve.gc_all()
                    cpu0 = serve.cpu_seconds()
                    r = run_clients(
                        1,
                        {"items": [[f"{serve.url}/{big_rel}", big_sha, blob_size]]},
                        work,
                        startup=0.3,
                    )
                    assert not r["failures"], r["failures"]
                    through.append(r["seconds"])
                    serve.idle()
                    cpu.append(serve.cpu_seconds() - cpu0)
                d, t = statistics.median(direct), statistics.median(through)
                # the floor of any pull-through that verifies before the last byte:
                # one SHA-256 pass over the blob (from the page cache) on this CPU
                h0 = time.perf_counter()
                with open(wl.root / big_rel, "rb") as f:
                    assert hashlib.file_digest(f, "sha256").hexdigest() == big_sha
                h = time.perf_counter() - h0
                rows.append(
                    (
                        f"(b) cold pull-through, {blob_size / 2**20:.0f} MiB, time to last byte (median of 3)",
                        f"{t:.2f} s",
                        f"{d:.2f} s direct",
                        fmt_ratio(t, d),
                        "<= 1.1x",
                    )
                )
                rows.append(
                    (
                        "(b) floor: SHA-256 of the blob on this CPU (one core, no I/O)",
                        f"{h:.2f} s",
                        f"{d:.2f} s direct",
                        fmt_ratio(h, d),
                        "-",
                    )
                )
                rows.append(
                    (
                        "(b) serve CPU per pull-through (read, write, hash, send)",
                        f"{statistics.median(cpu):.2f} CPU-s",
                        f"{os.cpu_count()} cores",
                        "-",
                        "-",
                    )
                )
            finally:
                serve.stop()

            # (c) thundering herd on a cold serve, peak RSS ------------------------------
            up.reset_log()
            serve = Serve(work / "store", up.channel_url("conda-forge"), work, "serve")
            try:
                r = run_clients(
                    herd,
                    {"items": at(serve.url), "threads": args.herd_threads, "verify": True},
                    work,
                    startup=3.0,
                )
                serve.idle()
                art_paths = {urlsplit(a.url).path for a in wl.artifacts}
                reqs = [q for q in up.requests if q.path in art_paths]
                rss = serve.peak_rss_mb()
                rows.append(
                    (
                        f"(c) herd: {herd} clients x {len(items)} artifacts, upstream requests",
                        str(len(reqs)),
                        f"{len(art_paths)} distinct",
                        "exact" if len(reqs) == len(art_paths) else "MISMATCH",
                        "= distinct artifacts",
                    )
                )
                up_bytes = sum(q.bytes_sent for q in reqs)
                rows.append(
                    (
                        "(c) herd: upstream bytes",
                        f"{up_bytes:,}",
                        f"{wl.total_bytes:,} in the lock",
                        "exact" if up_bytes == wl.total_bytes else "MISMATCH",
                        "= lock bytes",
                    )
                )
                rows.append(
                    (
                        "(c) herd: clients with every digest right",
                        f"{r['clients_ok']}/{herd}",
                        f"{r['bytes'] / 1e9:.1f} GB in {r['seconds']:.1f} s ({gbps(r):.2f} GB/s)",
                        "",
                        "all",
                    )
                )
                rows.append(
                    (
                        "(c) serve peak RSS (VmHWM) during the herd",
                        f"{rss:.0f} MB",
                        "",
                        "",
                        "< 200 MB",
                    )
                )
                if r["failures"]:
                    notes.append(f"herd failures (first 5): {r['failures'][:5]}")

                # (a) hits vs nginx ------------------------------------------------------
                big_serve = [[f"{serve.url}/{big_rel}", big_sha, blob_size]]
                run_clients(1, {"items": big_serve}, work, startup=0.3)  # fill it
                serve.idle()
                nginx, nginx_url = start_nginx(wl.root, work, args.nginx_workers)
                if nginx is None:
                    notes.append(nginx_url)
                try:
                    for k in client_counts:
                        repeat = max(1, 4 // k)
                        ours = run_clients(k, {"items": big_serve, "repeat": repeat}, work)
                        theirs = (
                            run_clients(
                                k,
                                {
                                    "items": [[f"{nginx_url}/{big_rel}", big_sha, blob_size]],
                                    "repeat": repeat,
                                },
                                work,
                            )
                            if nginx
                            else None
                        )
                        rows.append(
                            (
                                f"(a) hit, {blob_size / 2**20:.0f} MiB blob, {k} client(s)",
                                f"{gbps(ours):.2f} GB/s",
                                f"{gbps(theirs):.2f} GB/s nginx" if theirs else "-",
                                fmt_ratio(gbps(ours), gbps(theirs)) if theirs else "-",
                                ">= 0.8x nginx",
                            )
                        )
                        for res in (ours, theirs):
                            if res and res["failures"]:
                                notes.append(f"hit failures: {res['failures'][:3]}")
                    k = 8
                    ours = run_clients(k, {"items": at(serve.url)}, work)
                    theirs = run_clients(k, {"items": at(nginx_url)}, work) if nginx else None
                    rows.append(
                        (
                            f"(a) hits, {len(items)} artifacts x {k} clients, requests/s",
                            f"{ours['requests'] / ours['seconds']:.0f} req/s ({gbps(ours):.2f} GB/s)",
                            f"{theirs['requests'] / theirs['seconds']:.0f} req/s ({gbps(theirs):.2f} GB/s) nginx"
                            if theirs
                            else "-",
                            fmt_ratio(
                                ours["requests"] / ours["seconds"],
                                theirs["requests"] / theirs["seconds"],
                            )
                            if theirs
                            else "-",
                            ">= 0.8x nginx",
                        )
                    )
                finally:
                    if nginx is not None:
                        nginx.terminate()
                        nginx.wait(30)
            finally:
                serve.stop()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n### pixicache serve on loopback ({os.cpu_count()} CPUs, scale {scale})\n")
    print("| measurement | pixicache serve | reference | ratio | goal |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for note in notes:
        print(f"\nnote: {note}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_client":
        client_main(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
