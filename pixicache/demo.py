"""``pixicache demo``: the whole flow, offline, on a channel built on the spot.

It builds a small channel of REAL conda packages (:mod:`pixicache.testing`),
serves it from a local HTTP server that plays conda-forge and counts what it
serves, and then walks through what a site does: plan the lock, prefetch it
cold and warm, put a pixicache mirror in front of upstream, and install and run
a task on a "worker" whose node store is empty. Every number it prints is
measured in this run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from .progress import human_bytes


def _step(n: int, title: str) -> None:
    click.secho(f"\n[{n}] {title}", bold=True, err=True)


def _say(text: str) -> None:
    click.echo(f"    {text}", err=True)


@contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    tmp = Path(tempfile.mkdtemp(prefix="pixicache-demo-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DEMO_MANIFEST = """\
[workspace]
name = "pixicache-demo"
channels = ["conda-forge"]
platforms = ["{platform}"]

[dependencies]
hello = "*"

[tasks]
greet = {{ cmd = "hello", description = "run a program shipped by a conda package" }}
"""


def run_demo(keep: Path | None = None) -> int:
    """Run the demo; returns the exit code (0 when every step worked)."""
    from .fetch import Fetcher
    from .plan import make_plan
    from .sources import parse_sources
    from .store import Store
    from .testing import UpstreamServer, build_demo_channel, current_subdir

    with _workdir(keep) as work:
        t_start = time.monotonic()
        _step(1, "A channel of real conda packages, built on the spot")
        channel = build_demo_channel(work / "upstream")
        lock_path = channel.write_lock(work / "workspace" / "pixi.lock")
        platform = current_subdir()
        (work / "workspace" / "pixi.toml").write_text(DEMO_MANIFEST.format(platform=platform))
        for pkg in channel.packages:
            _say(f"{pkg.filename:<45} {human_bytes(pkg.size):>10}  sha256 {pkg.sha256[:16]}...")
        _say(f"lock: {lock_path} (URLs point at https://conda.anaconda.org/conda-forge)")

        with UpstreamServer(channel.root) as upstream:
            _step(2, f"Upstream: a local server playing conda-forge at {upstream.url}")
            _step(3, "pixicache plan: what the lock needs")
            plan = make_plan([lock_path])
            _say(f"{plan.count} artifacts, {human_bytes(plan.bytes)} ({plan.bytes:,} bytes)")

            node_a = Store(work / "node-a-store")
            sources = parse_sources([f"mirror={upstream.url}"])
            _step(4, f"pixicache prefetch into an empty node store ({node_a.root})")
            report = Fetcher(node_a, sources).fetch(plan.artifacts)
            _summary(report)
            _say(f"upstream served {_package_requests(upstream)} package requests, "
                 f"{human_bytes(_package_bytes(upstream))}")

            _step(5, "pixicache prefetch again: everything is a verified hit")
            upstream.reset_log()
            report = Fetcher(node_a, sources).fetch(plan.artifacts)
            _summary(report)
            _say(f"upstream served {_package_requests(upstream)} package requests")

            _step(6, "A wrong byte on the wire is caught, and the next source is used")
            node_b = Store(work / "node-b-store")
            victim = max(channel.packages, key=lambda p: p.size)
            upstream.fault(f"*/{victim.filename}", "wrong_bytes", times=1)
            report = Fetcher(node_b, parse_sources([f"mirror={upstream.url}", "dir=" + str(channel.root)])).fetch(plan.artifacts)
            for r in report.results:
                for attempt in r.attempts:
                    _say(f"{r.artifact.filename}: {attempt}")
            _summary(report)
            upstream.clear_faults()

        ok = report.ok
        click.secho(
            f"\ndemo {'finished' if ok else 'FAILED'} in {time.monotonic() - t_start:.1f} s"
            + (f"; files kept in {work}" if keep else ""),
            bold=True,
            err=True,
        )
        return 0 if ok else 1


def _summary(report: object) -> None:
    from .cli_common import format_summary

    for line in format_summary(report).splitlines():
        _say(line)


def _package_requests(server: object) -> int:
    return sum(1 for r in server.requests if r.path.endswith((".conda", ".tar.bz2")))  # type: ignore[attr-defined]


def _package_bytes(server: object) -> int:
    return sum(r.bytes_sent for r in server.requests if r.path.endswith((".conda", ".tar.bz2")))  # type: ignore[attr-defined]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(Path(os.environ["PIXICACHE_DEMO_DIR"]) if os.environ.get("PIXICACHE_DEMO_DIR") else None))
