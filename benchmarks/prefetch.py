#!/usr/bin/env python3
"""Benchmark: `pixicache prefetch` vs `curl --parallel` and `aria2c -j` on loopback.

All three fetch the same URLs of the size-faithful synthetic workload of the
shared GPU lock (121 artifacts; 3.71 GB at --scale 1.0) from one warm local
HTTP server (nginx from Debian when it can be started, else pixicache's test
server) to disk. pixicache also verifies every SHA-256 and commits to its
store; curl does not hash; aria2c is run both without and with per-file
SHA-256 checks. Prints a markdown table. Not run in CI.

    python benchmarks/prefetch.py --scale 1.0 --jobs 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pixicache.model.lockfile import Lock
from pixicache.testing import UpstreamServer, make_blob_workload


def start_nginx(root: Path, workdir: Path) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not nginx:
        return None, None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 2;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on; tcp_nopush on;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""
    )
    proc = subprocess.Popen([nginx, "-c", str(conf)], stderr=subprocess.DEVNULL)
    import httpx

    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
            return proc, f"http://127.0.0.1:{port}"
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    return None, None


def warm_page_cache(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def timed(cmd: list[str], **kw: object) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pixicache-bench-prefetch")
    ap.add_argument("--server", choices=["auto", "nginx", "builtin"], default="auto")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (best is reported)")
    args = ap.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    wl_root = work / f"workload-{args.scale}"
    wl = make_blob_workload(wl_root, scale=args.scale, seed=0)
    arts = Lock.load(wl.lock_path).artifacts(None, None)
    total = sum(a.size or 0 for a in arts)
    warm_page_cache(wl_root)

    proc, base = (None, None)
    if args.server in ("auto", "nginx"):
        proc, base = start_nginx(wl_root, work)
    server_name = "nginx"
    builtin = None
    if base is None:
        if args.server == "nginx":
            print("nginx could not be started", file=sys.stderr)
            return 1
        builtin = UpstreamServer(wl_root).start()
        base, server_name = builtin.url, "pixicache.testing.UpstreamServer"

    def url_of(a: object) -> str:
        from pixicache.sources.paths import channel_path

        return f"{base}{channel_path(a)}/{a.subdir}/{a.filename}"  # type: ignore[attr-defined]

    rows: list[tuple[str, float, str]] = []
    try:
        # pixicache
        best = float("inf")
        for _ in range(args.repeat):
            store = work / "store"
            shutil.rmtree(store, ignore_errors=True)
            t = timed([sys.executable, "-m", "pixicache", "--cache-dir", str(store), "prefetch", str(wl.lock_path),
                       "--source", f"mirror={base}", "--jobs", str(args.jobs), "--progress", "none"])
            best = min(best, t)
        rows.append(("pixicache prefetch (SHA-256 verified, committed)", best, "yes"))
        t2 = timed([sys.executable, "-m", "pixicache", "--cache-dir", str(work / "store"), "prefetch", str(wl.lock_path),
                    "--source", f"mirror={base}", "--progress", "none", "--json", str(work / "second.json")])
        second = json.loads((work / "second.json").read_text())
        second_note = f"second prefetch: {t2:.2f} s, {second['by_tier'].get('store', {}).get('artifacts', 0)} hits, 0 bytes transferred"

        # curl --parallel
        if shutil.which("curl"):
            best = float("inf")
            for _ in range(args.repeat):
                out = work / "curl"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                cfg = work / "curl.cfg"
                cfg.write_text("".join(f'url = "{url_of(a)}"\noutput = "{out}/{a.filename}"\n' for a in arts))
                best = min(best, timed(["curl", "--parallel", "--parallel-max", str(args.jobs), "-s", "-f", "-K", str(cfg)]))
            rows.append((f"curl --parallel --parallel-max {args.jobs}", best, "no"))

        # aria2c -j (without and with checksums)
        if shutil.which("aria2c"):
            for checked in (False, True):
                best = float("inf")
                for _ in range(args.repeat):
                    out = work / "aria2"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    lst = work / "aria2.txt"
                    lines = []
                    for a in arts:
                        lines.append(url_of(a))
                        lines.append(f"  out={a.filename}")
                        if checked:
                            lines.append(f"  checksum=sha-256={a.sha256}")
                    lst.write_text("\n".join(lines) + "\n")
                    best = min(best, timed(["aria2c", "-q", "-j", str(args.jobs), "-x", "1", "--allow-overwrite=true",
                                            "--auto-file-renaming=false", "--file-allocation=none", "-d", str(out), "-i", str(lst)]))
                rows.append((f"aria2c -j {args.jobs}" + (" (checksum=sha-256)" if checked else ""), best, "yes" if checked else "no"))
    finally:
        if proc:
            proc.terminate()
            proc.wait()
        if builtin:
            builtin.stop()

    fastest_peer = min((t for name, t, _ in rows if not name.startswith("pixicache")), default=None)
    print(f"\nprefetch benchmark: {len(arts)} artifacts, {total / 1e9:.3f} GB (scale {args.scale}), "
          f"server {server_name}, {args.jobs} parallel, loopback, {os.cpu_count()} CPUs\n")
    print("| tool | seconds | MB/s | verifies SHA-256 | speed vs fastest peer |")
    print("|---|---:|---:|:---:|---:|")
    for name, t, verifies in rows:
        ratio = f"{fastest_peer / t:.2f}x" if fastest_peer else "-"
        print(f"| {name} | {t:.2f} | {total / t / 1e6:.0f} | {verifies} | {ratio} |")
    print(f"\n{second_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
