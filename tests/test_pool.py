"""The simulated HTCondor pool (benchmarks/pool, issue 6) at 0.01 scale, and each fault.

Every job runs the real ``bootstrap.sh`` in its own sandbox with the single-file
agent, against real ``pixicache serve`` processes and a counting upstream serving
real conda packages (the size-faithful synthetic GPU environment at 1% size,
~36 MB, plus the ``pool-task`` package). Pools are small (2-3 nodes x 2 slots,
4-8 jobs) so the file runs in a few minutes on two cores.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pixicache.testing.condor import pyenv_python

from .helpers import pinned_bundle

REPO = Path(__file__).resolve().parent.parent
SCALE = 0.01

pytestmark = pytest.mark.timeout(400)


def _load_pool() -> ModuleType:
    """The simulator package ``benchmarks/pool`` (not installed: imported from its directory)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module("pool")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


pool = _load_pool()

pytest.importorskip("rattler", reason="the jobs install with py-rattler")
pytest.importorskip("aiohttp", reason="the mirrors are `pixicache serve` (the serve extra)")


WORKER_PYTHON = pyenv_python("3.9")  # EL9's python3: the jobs run on it
USERS = 2 if os.geteuid() == 0 else 1  # two Unix users share each node store (setpriv: root)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent as one file, as `pixicache bundle` builds it (the pinned wheels for
    Python >= 3.9 and both py-rattler builds), built once."""
    if WORKER_PYTHON is None:
        pytest.skip("pyenv has no Python 3.9 here: the CI pool runs its jobs on EL9's python3")
    return pinned_bundle(tmp_path_factory.mktemp("pool-bundle") / "pixicache.pyz").path


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory):
    """The upstream's files, shared by every pool of this module (read-only)."""
    return pool.prepare_workload(tmp_path_factory.mktemp("pool-upstream"), SCALE)


def run(tmp_path: Path, agent: Path, workload, **kw):
    kw.setdefault("worker_python", WORKER_PYTHON)
    kw.setdefault("users", USERS)
    cfg = pool.PoolConfig(
        workdir=tmp_path / "pool", bundle=agent, verbose=False, scale=SCALE, job_timeout=240, **kw
    )
    return pool.run_pool(cfg, workload=workload)


def failed_checks(result) -> list[str]:
    return [f"{name}: {detail}" for name, ok, detail in result.checks if not ok]


def explain(runs) -> str:
    return "\n\n".join(r.explain() for r in runs if r.rc != 0)


def node_blobs(tmp_path: Path, node: int) -> int:
    return len(pool._blobs(tmp_path / "pool" / "nodes" / f"node{node:02d}" / "store"))


# -- the CI pool: 3 nodes x 2 slots x 8 jobs, one fault (evict) -------------------------------


@pytest.mark.slow
def test_pool_shares_every_byte_and_survives_an_eviction(
    agent: Path, workload, tmp_path: Path
) -> None:
    result = run(
        tmp_path, agent, workload, nodes=3, slots=2, jobs=8,
        phases=("cold", "warm-mirror", "warm-nodes"), faults=("evict",),
    )  # fmt: skip
    n = len(workload.packages)
    env = workload.env_bytes
    cold, warm_mirror, warm_nodes = (
        result.phases[p] for p in ("cold", "warm-mirror", "warm-nodes")
    )

    # cold: conda-forge sends each distinct artifact exactly once (1x the environment)
    assert cold.upstream_requests == {p: 1 for p in workload.paths}
    assert cold.upstream_bytes == env == cold.upstream_via_mirror
    # every job exits 0; the evicted run stopped with SIGTERM's code and was re-run
    evicted = [r for r in cold.runs if r.evicted]
    assert len(evicted) == 1 and evicted[0].rc == 128 + signal.SIGTERM, explain(cold.runs)
    assert "stopped by SIGTERM" in evicted[0].stderr_tail
    assert [r.attempt for r in cold.runs if r.job == evicted[0].job] == [1, 2]
    for phase in (cold, warm_mirror, warm_nodes):
        assert all(r.rc == 0 for r in phase.runs if not r.evicted), explain(phase.runs)
        assert {r.job for r in phase.runs if r.rc == 0} == set(range(8))
        assert all(r.time_to_task is not None for r in phase.runs if r.rc == 0)
    # each node store is filled once: n blobs, never an artifact fetched twice into a node
    # (n fills over all its jobs; in the cold phase the evicted run's fills are not reported)
    assert cold.node_blobs == warm_mirror.node_blobs == {0: n, 1: n, 2: n}
    assert all(fills <= n for fills, _ in cold.per_node(3))
    assert [fills for fills, _ in warm_mirror.per_node(3)] == [n, n, n]
    for node in range(3):
        assert node_blobs(tmp_path, node) == n
        store = tmp_path / "pool" / "nodes" / f"node{node:02d}" / "store"
        partials = [*store.glob("partial/*"), *store.glob("user.*/partial/*")]
        assert not partials, "a partial download was left behind"
    # the site mirror sent each artifact once per node; a warm mirror costs upstream nothing
    # (the evicted run was sent bytes too: what it kept, resumed by the next job on its
    # node, and what was in flight when it died; at 1% scale whole artifacts fit in the
    # socket buffers, so that share is bounded by one environment, not by a ratio)
    assert cold.mirror_to_reported <= 3 * env <= cold.mirror_bytes
    assert cold.mirror_bytes - cold.mirror_to_reported <= env
    assert warm_mirror.upstream_bytes == 0 and warm_mirror.upstream_requests == {}
    assert warm_mirror.mirror_bytes == pytest.approx(3 * env, rel=0.02)
    # warm nodes: nothing moves
    assert all(r.fills == 0 and r.tier("store") == n for r in warm_nodes.runs)
    assert warm_nodes.upstream_bytes == 0 and warm_nodes.mirror_bytes < 0.01 * env
    assert not failed_checks(result), failed_checks(result)
    text = pool.markdown_report(result)
    assert "| cold | 9 | 8 | 1.00x |" in text


# -- each fault ------------------------------------------------------------------------------


@pytest.mark.slow
def test_site_mirror_killed_mid_fill_resumes_and_no_job_fails(
    agent: Path, workload, tmp_path: Path
) -> None:
    result = run(
        tmp_path, agent, workload, nodes=2, slots=2, jobs=4, phases=("cold",),
        faults=("mirror-restart",),
    )  # fmt: skip
    cold = result.phases["cold"]
    assert any("SIGKILLed mid-fill" in note for note in cold.notes), cold.notes
    assert all(r.rc == 0 for r in cold.runs), explain(cold.runs)
    assert set(cold.upstream_requests) == set(workload.paths)
    # the restarted mirror resumed what it had on disk with Range requests
    assert any("range bytes=" in r for r in cold.upstream_repeats), cold.upstream_repeats
    # only the bytes in flight at the kill were sent twice (explained by the check)
    assert not failed_checks(result), failed_checks(result)
    n = len(workload.packages)
    assert node_blobs(tmp_path, 0) == node_blobs(tmp_path, 1) == n


@pytest.mark.slow
def test_upstream_down_after_the_mirror_is_warm(agent: Path, workload, tmp_path: Path) -> None:
    result = run(
        tmp_path, agent, workload, nodes=2, slots=2, jobs=4,
        phases=("cold", "warm-mirror"), faults=("upstream-down",),
    )  # fmt: skip
    warm = result.phases["warm-mirror"]
    n = len(workload.packages)
    assert all(r.rc == 0 for r in warm.runs), explain(warm.runs)
    assert all(r.tier("upstream") == 0 for r in warm.runs)
    assert [warm.per_node(2)[i][0] for i in (0, 1)] == [n, n]  # new nodes, all from the mirror
    assert warm.upstream_requests == {}
    assert not failed_checks(result), failed_checks(result)


@pytest.mark.slow
def test_corrupt_blob_in_a_node_store_is_never_installed(
    agent: Path, workload, tmp_path: Path
) -> None:
    result = run(
        tmp_path, agent, workload, nodes=2, slots=2, jobs=4,
        phases=("cold", "warm-nodes"), faults=("corrupt-node-blob",),
    )  # fmt: skip
    warm = result.phases["warm-nodes"]
    _, name, _, _ = workload.largest()
    on_bad_node = [r for r in warm.runs if r.node == 0]
    assert on_bad_node
    for r in on_bad_node:
        # never installed from the corrupt blob: the job fails clearly, or it got good bytes
        assert r.checks.get("package_intact") is not False, r.explain()
        if r.rc != 0:
            assert r.error is not None and name in r.error["message"], r.explain()
            msg = r.error["message"].lower()
            # the digest check itself, or (a job beside it quarantined the bad blob
            # while this one installed) the blob gone from the store
            assert "checksum" in msg or "sha-256" in msg or "is not in the store" in msg
            assert "pixicache failed" in r.stderr_tail
    assert all(r.rc == 0 for r in warm.runs if r.node == 1), explain(warm.runs)
    # a job on node 0 catches the rot itself (its install's digest check), quarantines
    # the blob and fetches it again; else `pixicache cache verify` does, and the
    # recovery job fetches it. Either way node 0 gets it from the mirror once, and
    # the node runs jobs afterwards.
    recovery = result.phases["corrupt-recovery"].runs
    assert [r.rc for r in recovery] == [0], explain(recovery)
    assert sum(r.tier("mirror") for r in on_bad_node + recovery) == 1, explain(on_bad_node)
    assert not failed_checks(result), failed_checks(result)


@pytest.mark.slow
def test_full_mirror_disk_jobs_fall_through_to_upstream(
    agent: Path, workload, tmp_path: Path
) -> None:
    result = run(
        tmp_path, agent, workload, nodes=2, slots=2, jobs=4, phases=("cold",),
        faults=("mirror-disk-full",),
    )  # fmt: skip
    cold = result.phases["cold"]
    env = workload.env_bytes
    assert all(r.rc == 0 for r in cold.runs), explain(cold.runs)
    direct = cold.upstream_bytes - cold.upstream_via_mirror
    assert direct > 0 and any(r.tier("upstream") > 0 for r in cold.runs)
    # what the mirror could store it fetched once; jobs fetched the rest per node
    assert cold.upstream_via_mirror <= env
    assert cold.upstream_bytes <= env + 2 * env
    log = (tmp_path / "pool" / "site-mirror" / "serve.log").read_text()
    if result.mirror_disk == "tmpfs":  # a real ENOSPC: misses answered 507
        assert "store is full" in log
    assert not failed_checks(result), failed_checks(result)


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("squid") or os.path.exists("/usr/sbin/squid")),
    reason="squid is not installed (Debian: apt-get install squid)",
)
def test_squid_in_front_of_the_mirror_caches_archives(
    agent: Path, workload, tmp_path: Path
) -> None:
    result = run(
        tmp_path, agent, workload, nodes=2, slots=2, jobs=4,
        phases=("cold", "warm-mirror"), squid=True,
    )  # fmt: skip
    cold, warm = result.phases["cold"], result.phases["warm-mirror"]
    env, n = workload.env_bytes, len(workload.packages)
    for phase in (cold, warm):
        assert all(r.rc == 0 for r in phase.runs), explain(phase.runs)
        # every archive still verified: the agent commits only matching digests
        assert [phase.per_node(2)[i][0] for i in (0, 1)] == [n, n]
    assert cold.upstream_bytes == env
    # the mirror sees each artifact once although two nodes fetched everything
    assert sum(cold.mirror_requests.values()) == n, cold.mirror_requests
    assert cold.mirror_bytes == pytest.approx(env, rel=0.02)
    # new nodes: every archive is a squid hit, the mirror sends nothing
    assert sum(v for k, v in warm.squid.items() if "HIT" in k) == 2 * n, warm.squid
    assert sum(warm.mirror_requests.values()) == 0 and warm.mirror_bytes < 0.01 * env
    assert not failed_checks(result), failed_checks(result)


@pytest.fixture(scope="module")
def pypi_workload(tmp_path_factory: pytest.TempPathFactory):
    """The GPU lock's shape plus 20 wheels (~265 MB at scale 1.0), installed into a
    venv-style python over the workers' python3."""
    if WORKER_PYTHON is None:
        pytest.skip("pyenv has no Python 3.9 here: the CI pool runs its jobs on EL9's python3")
    return pool.prepare_workload(
        tmp_path_factory.mktemp("pool-upstream-pypi"), SCALE, pypi_python=WORKER_PYTHON
    )


def test_pool_with_pypi_wheels_shares_conda_and_pypi_bytes_alike(
    agent: Path, pypi_workload, tmp_path: Path
) -> None:
    """Jobs whose lock has [pypi-dependencies]: every wheel comes from upstream once
    (through the site mirror and each node's own serve), is installed into each job's
    environment by pixicache (INSTALLER uv-pixi), and a warm node fetches nothing."""
    result = run(
        tmp_path, agent, pypi_workload, nodes=2, slots=2, jobs=4, pypi=True, node_serve=True,
        phases=("cold", "warm-nodes"),
    )  # fmt: skip
    cold = result.phases["cold"]
    assert all(r.rc == 0 for r in cold.runs), explain(cold.runs)
    assert len(pypi_workload.pypi) == 20
    assert cold.upstream_pypi_bytes == pypi_workload.pypi_bytes > 0
    assert cold.upstream_bytes - cold.upstream_pypi_bytes == pypi_workload.conda_bytes
    assert all(r.checks["pypi_installed"] == 20 for r in result.phases["warm-nodes"].runs)
    assert not failed_checks(result), failed_checks(result)
