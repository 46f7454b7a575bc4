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

from pixicache.progress import human_bytes


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
    from pixicache.fetch import Fetcher
    from pixicache.model.plan import make_plan
    from pixicache.serve import ServeConfig, Upstream, start_background
    from pixicache.sources import parse_sources
    from pixicache.store import Store
    from pixicache.testing import UpstreamServer, build_demo_channel, current_subdir

    failures: list[str] = []
    with _workdir(keep) as work:
        t_start = time.monotonic()
        _step(1, "A channel of real conda packages, built on the spot")
        channel = build_demo_channel(work / "upstream")
        workspace = work / "workspace"
        lock_path = channel.write_lock(workspace / "pixi.lock")
        (workspace / "pixi.toml").write_text(DEMO_MANIFEST.format(platform=current_subdir()))
        for pkg in channel.packages:
            _say(f"{pkg.filename:<45} {human_bytes(pkg.size):>10}  sha256 {pkg.sha256[:16]}...")
        _say(f"workspace: {workspace} (pixi.toml + pixi.lock; URLs name https://conda.anaconda.org/conda-forge)")

        with UpstreamServer(channel.root) as upstream:
            _step(2, f"Upstream: a local server playing conda-forge at {upstream.url}")
            plan = make_plan([lock_path])
            _say(f"pixicache plan: {plan.count} artifacts, {human_bytes(plan.bytes)} ({plan.bytes:,} bytes)")

            cfg = ServeConfig(
                cache_dir=work / "mirror-store",
                port=0,
                upstreams=[Upstream.make("conda-forge", upstream.channel_url())],
                log_requests=False,
            )
            with start_background(cfg) as mirror:
                _step(3, f"pixicache serve: a pull-through mirror at {mirror.url} (empty)")
                env = {"PIXICACHE_SOURCES": f"mirror={mirror.url},upstream"}

                for n, (title, node) in enumerate(
                    [
                        ("Job 1 on node A (empty node store): pixicache run greet", "node-a"),
                        ("Job 2 on node B (empty node store): the mirror answers from its store", "node-b"),
                        ("Job 3 on node A again, in a fresh sandbox: all from the node store", "node-a"),
                    ],
                    start=4,
                ):
                    _step(n, title)
                    before_up = _package_requests(upstream)
                    before = _cache_counts(mirror)
                    rc, out = _job(workspace, work / f"sandbox-{n}", work / node, env)
                    after = _cache_counts(mirror)
                    for line in out:
                        _say(line)
                    _say(
                        f"mirror: {after['hit'] - before['hit']} hits, {after['miss'] - before['miss']} misses, "
                        f"{after['coalesced'] - before['coalesced']} coalesced; upstream: "
                        f"{_package_requests(upstream) - before_up} package requests"
                    )
                    if rc != 0:
                        failures.append(f"job {n - 3} exited {rc}")

                _step(7, "A wrong byte from upstream is caught by the mirror and never stored")
                bad = Store(work / "node-c")
                victim = max(channel.packages, key=lambda p: p.size)
                upstream.fault(f"*/{victim.filename}", "wrong_bytes", times=1)
                fresh = ServeConfig(
                    cache_dir=work / "mirror2-store",
                    port=0,
                    upstreams=[Upstream.make("conda-forge", upstream.channel_url())],
                    log_requests=False,
                )
                with start_background(fresh) as mirror2:
                    sources = parse_sources([f"mirror={mirror2.url}", f"dir={channel.root}"])
                    report = Fetcher(bad, sources).fetch(plan.artifacts)
                for r in report.results:
                    for attempt in r.attempts:
                        _say(f"{r.artifact.filename}: {attempt}")
                _summary(report)
                if not report.ok:
                    failures.append("the corrupted download was not recovered")

            _say("")
            _say(
                f"upstream served {_package_requests(upstream)} package requests in all, for "
                f"{len(channel.packages)} packages and 3 jobs on 2 nodes"
            )

        ok = not failures
        click.secho(
            f"\ndemo {'finished' if ok else 'FAILED: ' + '; '.join(failures)} in "
            f"{time.monotonic() - t_start:.1f} s" + (f"; files kept in {work}" if keep else ""),
            bold=True,
            err=True,
        )
        return 0 if ok else 1


def _job(workspace: Path, sandbox: Path, node_store: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run ``pixicache run greet`` as a job would: a fresh sandbox with the
    manifest and lock, the node's store, the mirror from the environment."""
    import json
    import subprocess

    sandbox.mkdir(parents=True)
    for name in ("pixi.toml", "pixi.lock"):
        shutil.copy2(workspace / name, sandbox / name)
    full_env = dict(os.environ, PIXICACHE_CACHE_DIR=str(node_store), **env)
    proc = subprocess.run(
        [sys.executable, "-m", "pixicache", "run", "greet", "from", "the", "demo"],
        cwd=sandbox,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [f"task output: {line}" for line in proc.stdout.splitlines()]
    try:
        report = json.loads((sandbox / "pixicache-report.json").read_text())
        tiers = report.get("tiers") or {}
        lines.append(
            "pixicache-report.json: artifacts from "
            + ", ".join(f"{tier} {v['artifacts']}" for tier, v in tiers.items() if v.get("artifacts"))
            + f"; installer {(report.get('installer') or {}).get('name', '?')}"
            + f"; time to task {report.get('time_to_task') or 0:.2f} s; exit {report.get('exit_code')}"
        )
    except (OSError, ValueError):
        lines += [f"stderr: {line}" for line in proc.stderr.splitlines()[-10:]]
    return proc.returncode, lines


def _cache_counts(mirror: object) -> dict[str, int]:
    registry = mirror.app.metrics.registry  # type: ignore[attr-defined]
    return {
        k: int(registry.get_sample_value("pixicache_serve_cache_total", {"result": k}) or 0)
        for k in ("hit", "miss", "coalesced")
    }


def _summary(report: object) -> None:
    from pixicache.cli.common import format_summary

    for line in format_summary(report).splitlines():
        _say(line)


def _package_requests(server: object) -> int:
    return sum(1 for r in server.requests if r.path.endswith((".conda", ".tar.bz2")))  # type: ignore[attr-defined,misc]


def _package_bytes(server: object) -> int:
    return sum(r.bytes_sent for r in server.requests if r.path.endswith((".conda", ".tar.bz2")))  # type: ignore[attr-defined]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(Path(os.environ["PIXICACHE_DEMO_DIR"]) if os.environ.get("PIXICACHE_DEMO_DIR") else None))
