"""The command line of ``python benchmarks/pool``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import FAULTS, PHASES
from .jobs import PoolConfig
from .report import markdown_report, plot
from .run import run_pool


def main(argv: list[str] | None = None) -> int:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(
        prog="benchmarks/pool", description=sys.modules[__package__].__doc__, formatter_class=Formatter
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
        "--worker-python",
        default=None,
        metavar="PY",
        help="the jobs' python3, a path or a version (3.9: EL9's, from pyenv): it is the only "
        "python3 on the jobs' PATH, and the agent is the pinned-wheel bundle "
        "(default: the system python3, with the bundle of this interpreter's packages)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=1,
        help="Unix users per node sharing its store (slot k runs as uid 5001 + k mod USERS; "
        "needs root: setpriv)",
    )
    parser.add_argument(
        "--wheelhouse", type=Path, default=None, help="where the pinned wheels are kept (--worker-python)"
    )
    parser.add_argument(
        "--pypi",
        action="store_true",
        help="the workload with PyPI wheels: the GPU lock's shape plus ~300 MB of wheels "
        "(at --scale 1.0) installed into a venv-style python over the worker python",
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
    parser.add_argument(
        "--shaped",
        metavar="RATE",
        default=None,
        help="put the upstream behind a tc-tbf-shaped veth between two network namespaces "
        "(a tc rate: 1gbit, 200mbit), so cold time-to-task reflects a WAN upstream (root)",
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
        worker_python=args.worker_python,
        users=args.users,
        wheelhouse=args.wheelhouse,
        pypi=args.pypi,
        shaped=args.shaped,
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
