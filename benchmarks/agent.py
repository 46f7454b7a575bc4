#!/usr/bin/env python3
"""The agent's install times on a size-faithful environment of REAL conda packages.

For each ``--scale``, :func:`pixicache.testing.make_package_workload` builds
installable packages whose payload sizes are the shared GPU lock's (121
packages, 3.7 GB at scale 1.0) times the scale, and their lock; an
:class:`~pixicache.testing.UpstreamServer` serves them as the local mirror.
Then, each as a fresh process, as a job runs it (``python -I pixicache.pyz``, the
single-file agent built once from this interpreter's packages, unpacked on the first
start as on a node):

``cold``
    ``pixicache install`` with an empty node store and package cache: fetch
    everything from the mirror, extract, link.
``warm``
    ``pixicache install`` in a fresh working directory on the same node: the
    store and the package cache are warm (every artifact a store hit, no
    request), only the prefix is new.
``rattler``
    a plain py-rattler process doing the same install: start the interpreter
    (``python -I`` as well), import rattler, read the lock, ``rattler.install`` its
    records into a fresh prefix with the same warm package cache.
``no-op``
    ``pixicache install`` again in a workspace whose prefix is current (what a
    job re-run on the node pays), wall time of the process and the agent's own.

``warm`` and ``rattler`` alternate ``--repeat`` times; the table gives the best of
each, the ratio warm / rattler of the best runs and of the medians, and the median of
the ratios of each warm run to the plain run right after it (the machine's speed
drifts: a pair sees the same machine). The goal: <= 1.3; reported, not asserted.
Wall times include the interpreter start of both (what a job sees); ``agent`` is the
time the agent itself reports. Both run on the same interpreter, set up as a node's
python3 with py-rattler installed (:func:`node_python`): a virtual environment of this
Python whose ``site`` holds the directory py-rattler is in and nothing else, so neither
pays for this checkout's editable install (its finder, loaded by ``site`` at every start,
is 5-20 ms that a node's python3 never spends).

    python benchmarks/agent.py --scale 0.01 --scale 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pixicache.testing import UpstreamServer, make_package_workload  # noqa: E402

MANIFEST = """[workspace]
name = "bench"
channels = ["conda-forge"]
platforms = ["{platform}"]

[tasks]
noop = "true"
"""


PLAIN = r"""
import asyncio, json, os, sys, time
from pathlib import Path
import rattler
lock, env_name, platform, prefix, cache = sys.argv[1:6]
# everything a job's installer has to do: the interpreter has started, rattler is
# imported; now read the lock and install
lf = rattler.LockFile.from_path(lock)
env = lf.environment(env_name)
plat = [p for p in env.platforms() if p.name == platform][0]
records = env.conda_repodata_records_for_platform(plat)
t = time.perf_counter()
asyncio.run(rattler.install(records, target_prefix=prefix, cache_dir=Path(cache), show_progress=False))
print(json.dumps({"seconds": time.perf_counter() - t}))
sys.stdout.flush()
os._exit(0)
"""


def node_python(base: Path) -> str:
    """The interpreter both sides run on (see the module doc), created under ``base``."""
    import venv

    import rattler  # found where this interpreter has it

    home = base / "node-python"
    if not (home / "bin" / "python").exists():
        venv.create(home, symlinks=True, with_pip=False)
        site = next((home / "lib").glob("python3*/site-packages"))
        (site / "py-rattler.pth").write_text(str(Path(rattler.__file__).resolve().parents[1]) + "\n")
    return str(home / "bin" / "python")


class Agent:
    """The single-file agent as a job runs it: ``python -I pixicache.pyz``, unpacked
    under ``home`` (the first start unpacks, as a node's first job does)."""

    def __init__(self, base: Path) -> None:
        from pixicache.bundle.build import build_bundle

        self.pyz = base / "pixicache.pyz"
        self.python = node_python(base)
        build_bundle(self.pyz, source="installed", compresslevel=1)
        self.env = {**os.environ, "PIXICACHE_BUNDLE_DIR": str(base / "bundles")}
        self.env.pop("PIXICACHE_SOURCES", None)

    def install(self, ws: Path, store: Path, mirror: str) -> dict[str, Any]:
        argv = [
            self.python,
            "-I",
            str(self.pyz),
            "--cache-dir",
            str(store),
            "install",
            "--source",
            f"mirror={mirror}",
        ]
        t = time.perf_counter()
        proc = subprocess.run(argv, cwd=ws, capture_output=True, text=True, env=self.env)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"pixicache install failed ({proc.returncode}):\n{proc.stderr}")
        report = json.loads((ws / "pixicache-report.json").read_text())
        return {"wall": wall, "agent": report["seconds"], "report": report}


def plain_install(
    python: str, lock: Path, env: str, platform: str, prefix: Path, cache: Path
) -> tuple[float, float]:
    """(wall time of the whole plain process, seconds inside rattler.install)."""
    t = time.perf_counter()
    proc = subprocess.run(
        [python, "-I", "-c", PLAIN, str(lock), env, platform, str(prefix), str(cache)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"plain rattler.install failed:\n{proc.stderr}")
    return wall, float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


def workspace(root: Path, lock: Path, platform: str) -> Path:
    root.mkdir(parents=True)
    shutil.copy(lock, root / "pixi.lock")
    (root / "pixi.toml").write_text(MANIFEST.format(platform=platform))
    return root


def bench(scale: float, base: Path, repeat: int) -> dict[str, Any]:
    t = time.perf_counter()
    wl = make_package_workload(base / "workload", scale=scale)
    build = time.perf_counter() - t
    store = base / "node-store"
    agent = Agent(base)
    with UpstreamServer(wl.root) as srv:
        cold = agent.install(workspace(base / "cold", wl.lock_path, wl.platform), store, srv.url)
        requests_cold = len(srv.requests)
        srv.reset_log()
        warm, plain = [], []
        for i in range(repeat):  # alternating, so both see the same machine
            warm.append(
                agent.install(
                    workspace(base / f"warm{i}", wl.lock_path, wl.platform), store, srv.url
                )
            )
            plain.append(
                plain_install(
                    agent.python,
                    wl.lock_path,
                    wl.environment,
                    wl.platform,
                    base / f"plain{i}" / "env",
                    store / "pkgs",
                )
            )
        requests_warm = len(srv.requests)
        noop = [agent.install(base / "warm0", store, srv.url) for _ in range(repeat)]
    best_warm = min(w["wall"] for w in warm)
    best_plain = min(p[0] for p in plain)
    return {
        "scale": scale,
        "packages": len(wl.artifacts),
        "bytes": wl.total_bytes,
        "build_s": build,
        "cold_wall": cold["wall"],
        "cold_agent": cold["agent"],
        "cold_phases": cold["report"]["phases"],
        "cold_requests": requests_cold,
        "warm_wall": best_warm,
        "warm_wall_median": statistics.median(w["wall"] for w in warm),
        "warm_agent": min(w["agent"] for w in warm),
        "warm_phases": min(warm, key=lambda w: w["wall"])["report"]["phases"],
        "warm_requests": requests_warm,
        "rattler": best_plain,
        "rattler_median": statistics.median(p[0] for p in plain),
        "rattler_install": min(p[1] for p in plain),
        "noop_wall": min(n["wall"] for n in noop),
        "noop_agent": min(n["agent"] for n in noop),
        "ratio": best_warm / best_plain,
        "ratio_median": statistics.median(w["wall"] for w in warm)
        / statistics.median(p[0] for p in plain),
        # each warm run over the plain run right after it: the machine's drift cancels
        "ratio_paired": statistics.median(w["wall"] / p[0] for w, p in zip(warm, plain)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", type=float, action="append", help="workload scale (repeatable; default 0.01)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="warm and plain runs (best is reported)"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="work in this directory and keep it"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    scales = args.scale or [0.01]
    base = args.keep or Path(tempfile.mkdtemp(prefix="pixicache-bench-agent-"))
    rows = []
    try:
        for scale in scales:
            rows.append(bench(scale, base / f"scale-{scale:g}", max(1, args.repeat)))
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print(
        "| scale | packages | size | cold install (agent) | warm-node install (agent) "
        "| plain py-rattler process (its install call) | warm / rattler, best (median) "
        "| warm / rattler, pairs (median) | no-op reinstall (agent) | requests cold / warm |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scale']:g} | {r['packages']} | {r['bytes'] / 1e6:.1f} MB "
            f"| {r['cold_wall']:.2f} s ({r['cold_agent']:.2f} s) "
            f"| {r['warm_wall']:.2f} s ({r['warm_agent']:.2f} s) "
            f"| {r['rattler']:.2f} s ({r['rattler_install']:.2f} s) | {r['ratio']:.2f}x ({r['ratio_median']:.2f}x) "
            f"| {r['ratio_paired']:.2f}x "
            f"| {r['noop_wall']:.2f} s ({r['noop_agent'] * 1000:.0f} ms) "
            f"| {r['cold_requests']} / {r['warm_requests']} |"
        )
    for r in rows:
        print(
            f"scale {r['scale']:g}: cold phases {r['cold_phases']}; warm phases {r['warm_phases']}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.pop("PIXICACHE_SOURCES", None)
    sys.exit(main())
