#!/usr/bin/env python3
"""How ``SEND_SLICE`` (pixicache/serve/http.py) moves the hit rate beside nginx. Prints a table.

For each ``--workers`` count: pixicache once per slice size (the constant set in each
server process by a ``sitecustomize`` module on its ``PYTHONPATH``; nothing else
differs) and nginx with as many workers, all warm on the same 121 artifacts (the GPU
lock's, ``--scale`` 0.1), then ``--rounds`` rounds in which each server in turn serves
``wrk`` (2 threads, 8 connections, ``--seconds``), the order rotating each round and
reversed every other one, so the servers of a round are measured seconds apart. The
table gives the median rate, the median of the per-round ratios to nginx (and their
quartiles), and the CPU per request of the server and of wrk.

    python benchmarks/send_slice.py                      # 512K,1M,2M,4M,0 (0: no limit)
    python benchmarks/send_slice.py --workers 2 --slices 512K,1M --rounds 20

Needs nginx and wrk (``apt-get install nginx wrk``). The client shares the machine's
cores with the server, as in ``benchmarks/serve.py --only hits``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve as S

NO_LIMIT = 1 << 40


def parse_size(text: str) -> int:
    """``512K``, ``1M``, ``1536K`` or ``0`` (no limit: until the socket is full)."""
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20}
    value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    return value or NO_LIMIT


def slice_name(size: int) -> str:
    if size == NO_LIMIT:
        return "no limit"
    return f"{size >> 20} MiB" if size % (1 << 20) == 0 else f"{size >> 10} KiB"


def sliced_env(size: int, work: Path) -> dict[str, str]:
    """The environment of a pixicache server whose ``SEND_SLICE`` is ``size``."""
    d = work / f"slice-{size}"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(f"import pixicache.serve.http as h\nh.SEND_SLICE = {size}\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")])))


def measure(root: Path, up: S.Server, items: list[list[object]], work: Path, workers: int,
            slices: list[int], rounds: int) -> dict[str, list[tuple[float, float, float]]]:
    """(req/s, server ms/request, wrk ms/request) per round, by server name."""
    servers: list[S.Server] = []
    try:
        for size in slices:
            px = S.start_pixicache(up.url, work, f"px{workers}-{size}", workers, env=sliced_env(size, work))
            px.name = f"pixicache x{workers}, {slice_name(size)}"
            servers.append(px)
        ng = S.start_nginx_static(root, work, f"ng{workers}", "127.0.0.1", workers)
        servers.append(ng)
        for srv in servers:  # fills pixicache's stores, then every server answers each once
            at = [[str(it[0]).replace("{base}", srv.url), it[1], it[2]] for it in items]
            for clients in ((4, 1) if srv is not ng else (1,)):
                r = S.run_clients(clients, {"items": at, "threads": 4}, work, startup=0.3)
                if r["failures"]:
                    raise RuntimeError(f"warming {srv.name}: {r['failures'][:3]}")
        out: dict[str, list[tuple[float, float, float]]] = {s.name: [] for s in servers}
        for i in range(rounds):
            k = i % len(servers)
            order = servers[k:] + servers[:k]
            for srv in order if i % 2 == 0 else order[::-1]:
                c0, k0 = srv.cpu(), S.children_cpu()
                rate = S.wrk_rate(srv.url, items, work, threads=2)
                n = rate * S.WRK_SECONDS
                out[srv.name].append((rate, (srv.cpu() - c0) / n * 1e3, (S.children_cpu() - k0) / n * 1e3))
        return out
    finally:
        for srv in servers:
            srv.stop()


def table(results: dict[str, list[tuple[float, float, float]]], workers: int) -> list[str]:
    nginx = next(v for k, v in results.items() if k.startswith("nginx"))
    lines = [
        f"| server ({workers} worker{'s' if workers > 1 else ''}) | req/s | ÷ nginx (quartiles) "
        "| server CPU ms/request | wrk CPU ms/request |",
        "|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        ratios = [r[0] / g[0] for r, g in zip(rows, nginx) if g[0]]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        lines.append(
            f"| {name} | {statistics.median(r[0] for r in rows):.0f} | "
            f"{statistics.median(ratios):.3f}x ({q[0]:.2f}-{q[2]:.2f}) | "
            f"{statistics.median(r[1] for r in rows):.2f} | {statistics.median(r[2] for r in rows):.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    parser.add_argument("--slices", default="512K,1M,2M,4M,0", help="slice sizes; 0 is no limit")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=int, default=2, help="wrk's run per measurement")
    parser.add_argument("--scale", type=float, default=0.1)
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if not (S.nginx_bin() if tool == "nginx" else shutil.which(tool)):
            print(f"{tool} is not installed here: apt-get install {tool}", file=sys.stderr)
            return 2
    from pixicache.testing import make_blob_workload

    S.WRK_SECONDS = args.seconds
    slices = [parse_size(s) for s in args.slices.split(",")]
    with tempfile.TemporaryDirectory(prefix="pixicache-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers read below it
        wl = make_blob_workload(work / "upstream", scale=args.scale, seed=1)
        S.world_readable(wl.root)
        items = S.hit_items(wl)
        lines = [f"### SEND_SLICE: {len(items)} artifacts, wrk 2 threads x 8 connections, "
                 f"{args.rounds} rounds of {args.seconds} s", ""]
        with S.upstream_at(wl.root, work, None) as (up, _log, _link):
            for workers in (int(w) for w in args.workers.split(",")):
                lines += [*table(measure(wl.root, up, items, work, workers, slices, args.rounds), workers), ""]
    cmd = " ".join(["python", "benchmarks/send_slice.py", *(argv if argv is not None else sys.argv[1:])])
    lines.append(f"({cmd}; {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')})")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
