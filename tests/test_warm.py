"""`pixicache prefetch --to MIRROR`: warming a pixicache mirror from a lock."""

from __future__ import annotations

import json

import pytest

from pixicache import serve
from pixicache.testing import UpstreamServer

from .helpers import run_pixicache


@pytest.fixture
def mirror(blob_workload, tmp_path):
    with UpstreamServer(blob_workload.root) as upstream:
        cfg = serve.ServeConfig(
            cache_dir=tmp_path / "mirror-store",
            port=0,
            upstreams=[serve.Upstream.make("conda-forge", upstream.channel_url())],
        )
        with serve.start_background(cfg) as srv:
            yield srv, upstream


def test_prefetch_to_a_mirror_fills_it_once_then_workers_never_reach_upstream(mirror, blob_workload, tmp_path):
    srv, upstream = mirror
    res = run_pixicache("prefetch", "--to", srv.url, str(blob_workload.lock_path), "--progress", "none",
                        "--json", str(tmp_path / "w1.json"))
    assert res.returncode == 0, res.stderr
    w1 = json.loads((tmp_path / "w1.json").read_text())
    assert (w1["filled"], w1["hit"], w1["failed"]) == (121, 0, [])
    gets = [r for r in upstream.requests if r.method == "GET" and r.path.endswith((".conda", ".tar.bz2"))]
    assert len(gets) == 121 and sum(r.bytes_sent for r in gets) == blob_workload.total_bytes

    upstream.reset_log()
    res = run_pixicache("prefetch", "--to", srv.url, str(blob_workload.lock_path), "--progress", "none",
                        "--json", str(tmp_path / "w2.json"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "w2.json").read_text())["hit"] == 121
    res = run_pixicache("--cache-dir", str(tmp_path / "worker"), "prefetch", str(blob_workload.lock_path),
                        "--source", f"mirror={srv.url}", "--progress", "none")
    assert res.returncode == 0, res.stderr
    assert upstream.requests == []


def test_prefetch_to_a_mirror_reports_what_it_could_not_fill(mirror, blob_workload, tmp_path):
    srv, upstream = mirror
    victim = blob_workload.artifacts[0]
    upstream.fault(f"*/{victim.filename}", "wrong_bytes")
    res = run_pixicache("prefetch", "--to", srv.url, str(blob_workload.lock_path), "--progress", "none")
    assert res.returncode == 3
    assert victim.filename in res.stderr and "FAILED: 1 artifact(s)" in res.stderr
    assert "Traceback" not in res.stderr
