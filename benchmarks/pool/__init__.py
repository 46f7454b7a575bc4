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

``mirror-restart``    the site mirror is SIGKILLed while its fill of the largest
                      artifact (throttled upstream) is half-way on disk, and
                      restarted on the same port at once (it resumes with Range);
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

    python benchmarks/pool --scale 0.01 --nodes 3 --slots 2 --jobs 8      # ~1-2 min
    python benchmarks/pool --scale 0.1                                     # the acceptance run
    python benchmarks/pool --scale 0.01 --fault mirror-restart --fault evict
    python benchmarks/pool --scale 0.01 --squid --phases cold,warm-mirror

Requirements: the ``bench`` extra (``pip install -e '.[bench]'``: py-rattler,
aiohttp, prometheus_client, matplotlib), bash and coreutils, a python3 >= 3.10
outside any virtualenv for the jobs (else this interpreter's base is used), and
for ``--squid`` the Debian ``squid`` package. Disk: about (nodes + 2 x running
baseline jobs) x 2 x environment bytes.
"""

from __future__ import annotations

from .cli import main
from .common import FAULTS, PHASES, _blobs, free_port, percentile  # noqa: F401  (_blobs: for tests)
from .faults import corrupt_node_blob, installed_files_intact
from .jobs import JobRun, PhaseResult, Pool, PoolConfig, PoolResult
from .report import markdown_report, plot
from .run import run_pool
from .servers import ServeProcess, Squid, small_filesystem, squid_config
from .workload import PreparedWorkload, prepare_workload

__all__ = [
    "FAULTS",
    "PHASES",
    "JobRun",
    "PhaseResult",
    "Pool",
    "PoolConfig",
    "PoolResult",
    "PreparedWorkload",
    "ServeProcess",
    "Squid",
    "corrupt_node_blob",
    "free_port",
    "installed_files_intact",
    "main",
    "markdown_report",
    "percentile",
    "plot",
    "prepare_workload",
    "run_pool",
    "small_filesystem",
    "squid_config",
]
