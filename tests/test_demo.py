"""`pixicache demo`, the README's first command, works offline and says what happened."""

from __future__ import annotations

from .helpers import run_pixicache


def test_demo_runs_the_whole_flow_offline(tmp_path):
    res = run_pixicache("demo", "--keep", str(tmp_path / "demo"))
    assert res.returncode == 0, res.stderr[-3000:]
    err = res.stderr
    assert "demo finished" in err and "Traceback" not in err
    # job 1 fills the mirror, job 2 is served by it, job 3 by its node store
    assert "mirror: 0 hits, 4 misses, 0 coalesced; upstream: 4 package requests" in err
    assert "mirror: 4 hits, 0 misses, 0 coalesced; upstream: 0 package requests" in err
    assert "artifacts from store 4" in err
    assert "task output: hello from" in err and "arg: demo" in err
    assert "SHA-256 mismatch" in err
    assert (tmp_path / "demo" / "sandbox-4" / "pixicache-report.json").exists()
