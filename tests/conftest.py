"""Shared fixtures: real conda channels and real local HTTP servers (pixicache.testing)."""

from __future__ import annotations

import pytest

from pixicache.testing import UpstreamServer, build_demo_channel, make_blob_workload


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path_factory, monkeypatch):
    """No test reads the developer's own pixicache config or sources."""
    cfg = tmp_path_factory.getbasetemp() / "no-config.toml"
    monkeypatch.setenv("PIXICACHE_CONFIG", str(cfg))
    for var in ("PIXICACHE_SOURCES", "PIXICACHE_CACHE_DIR", "PIXICACHE_JOBS", "PIXICACHE_PIXI_PINS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def demo_channel(tmp_path_factory):
    """The demo channel of real packages (hello, a placeholder binary, python shim...)."""
    return build_demo_channel(tmp_path_factory.mktemp("demo-channel"))


@pytest.fixture(scope="session")
def demo_lock(demo_channel, tmp_path_factory):
    """A v6 pixi.lock of the demo channel, with conda-forge URLs."""
    return demo_channel.write_lock(tmp_path_factory.mktemp("demo-lock") / "pixi.lock")


@pytest.fixture
def demo_upstream(demo_channel):
    """A counting real HTTP server playing conda-forge for the demo channel."""
    with UpstreamServer(demo_channel.root) as srv:
        yield srv


@pytest.fixture(scope="session")
def blob_workload(tmp_path_factory):
    """The size-faithful synthetic workload of the shared GPU lock at scale 0.01 (~37 MB)."""
    return make_blob_workload(tmp_path_factory.mktemp("blob-workload"), scale=0.01, seed=1)


@pytest.fixture
def workload_upstream(blob_workload):
    with UpstreamServer(blob_workload.root) as srv:
        yield srv


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "store"
    return d
