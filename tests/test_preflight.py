"""Preflight: fail fast, with an actionable message, before downloading anything.

The CUDA driver is found through ``CONDA_OVERRIDE_CUDA``, NVML or
``nvidia-smi``; this machine has no NVIDIA driver, so the tests use the
override, a stand-in ``nvidia-smi`` on ``PATH``, or point the NVML library
name at nothing.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

import pixicache.agent.preflight as pf
from pixicache.agent.preflight import detect_cuda_driver, preflight, system_requirements
from pixicache.errors import LockError, PreflightError
from pixicache.model.lockfile import Lock
from pixicache.model.manifest import Manifest
from pixicache.sources import parse_sources
from pixicache.store import Store
from pixicache.testing.locks import LockPackage, write_lock
from pixicache.testing.server import UpstreamServer

CF = "https://conda.anaconda.org/conda-forge"


def pkg(name: str, depends: list[str], data: bytes, subdir: str = "linux-64") -> LockPackage:
    return LockPackage(
        "conda",
        f"{CF}/{subdir}/{name}-1.0-h0_0.conda",
        hashlib.sha256(data).hexdigest(),
        name,
        "1.0",
        build="h0_0",
        size=len(data),
        depends=depends,
    )


TORCH = b"t" * 4000
LIBC = b"c" * 1000


@pytest.fixture
def lock(tmp_path: Path) -> Lock:
    path = write_lock(
        tmp_path / "ws" / "pixi.lock",
        {
            "default": {
                "linux-64": [
                    pkg("pytorch", ["__cuda >=12.9", "libc-ish >=1"], TORCH),
                    pkg("libc-ish", ["__glibc >=2.17,<3.0.a0"], LIBC),
                ]
            },
            "cpu": {"linux-64": [pkg("libc-ish", ["__glibc >=2.17,<3.0.a0"], LIBC)]},
        },
    )
    return Lock.load(path)


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """This node: no NVIDIA driver unless a test says otherwise."""
    monkeypatch.delenv("CONDA_OVERRIDE_CUDA", raising=False)
    monkeypatch.delenv("CONDA_OVERRIDE_GLIBC", raising=False)
    monkeypatch.setattr(pf, "NVML_LIBRARIES", ("libnvidia-ml-absent-for-tests.so.1",))
    monkeypatch.setattr(pf, "NVIDIA_SMI", "nvidia-smi-absent-for-tests")
    return tmp_path


def run(lock: Lock, node: Path, env: str = "default", sources=None, **kw):
    store = kw.pop("store", None) or Store(node / "store")
    return preflight(
        lock,
        env,
        "linux-64",
        prefix=node / "ws" / ".pixi" / "envs" / env,
        store=store,
        sources=parse_sources(["upstream"]) if sources is None else sources,
        **kw,
    )


def fill(store: Store, lock: Lock, env: str = "default") -> None:
    for art in lock.artifacts(env, "linux-64"):
        data = TORCH if art.extra["name"] == "pytorch" else LIBC
        src = store.root.parent / art.filename
        src.write_bytes(data)
        store.add_file(src, art)


def test_driver_too_old_fails_with_the_submit_file_fix(lock, node, monkeypatch):
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.2")
    with pytest.raises(PreflightError) as err:
        run(lock, node)
    text = str(err.value)
    assert "this node's NVIDIA driver supports CUDA 12.2 (from CONDA_OVERRIDE_CUDA)" in text
    assert "the environment needs 12.9 (pytorch 1.0 depends on __cuda >=12.9)" in text
    assert "add `requirements = (GPUs_DriverVersion >= 12.9)` to the submit file" in text
    assert err.value.exit_code == 8


def test_driver_new_enough_passes(lock, node, monkeypatch):
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.10")  # 12.10 > 12.9 as versions, not decimals
    report = run(lock, node)
    assert report.ok
    status = {c.name: c.status for c in report.checks}
    assert status["platform"] == status["cuda"] == status["glibc"] == status["disk"] == "ok"
    assert status["mirror"] == "skipped"  # upstream only: nothing to probe
    assert report.cuda is not None and report.cuda.version == "12.10"
    assert {r.name: r.minimum for r in report.requirements} == {"__cuda": "12.9", "__glibc": "2.17"}
    assert report.to_json()["cuda_driver"] == {"version": "12.10", "source": "CONDA_OVERRIDE_CUDA"}


def test_no_driver_says_to_request_a_gpu(lock, node):
    with pytest.raises(PreflightError) as err:
        run(lock, node)
    text = str(err.value)
    assert "no NVIDIA driver found on this node (no libnvidia-ml / nvidia-smi)" in text
    assert (
        "the environment needs CUDA 12.9" in text and "request a GPU (`request_gpus = 1`)" in text
    )


def test_empty_cuda_override_means_no_cuda(lock, node, monkeypatch):
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "")
    with pytest.raises(PreflightError, match="CONDA_OVERRIDE_CUDA is empty"):
        run(lock, node)


def test_an_environment_without_cuda_needs_no_driver(lock, node):
    report = run(lock, node, env="cpu")
    assert report.ok and report.cuda is None
    assert "cuda" not in {c.name for c in report.checks}


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (
            "echo '| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2 |'",
            "12.2",
        ),
        ('if [ "$1" = "--query-gpu=driver_version" ]; then echo 575.57.08; fi', "12.9"),
    ],
)
def test_nvidia_smi_is_asked_when_nvml_is_missing(node, monkeypatch, script, expected):
    bindir = node / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi-standin"
    smi.write_text(f"#!/bin/sh\n{script}\n")
    smi.chmod(0o755)
    monkeypatch.setattr(pf, "NVIDIA_SMI", "nvidia-smi-standin")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    assert detect_cuda_driver().version == expected


def test_manifest_system_requirements_of_the_environment_count(tmp_path, node, monkeypatch):
    path = write_lock(
        tmp_path / "ws2" / "pixi.lock", {"gpu": {"linux-64": [pkg("libc-ish", [], LIBC)]}}
    )
    manifest = path.parent / "pixi.toml"
    manifest.write_text(
        '[workspace]\nname = \'x\'\n[system-requirements]\ncuda = "12"\nlibc = { family = "glibc", version = "2.28" }\n'
        '[feature.gpu.system-requirements]\ncuda = "12.9"\n'
        '[environments]\ngpu = ["gpu"]\n'
    )
    reqs = {r.name: r for r in system_requirements(Lock.load(path), "gpu", "linux-64", Manifest.load(manifest))}
    assert reqs["__cuda"].minimum == "12.9"
    assert '[feature.gpu.system-requirements] cuda = "12.9"' in reqs["__cuda"].why
    assert reqs["__glibc"].minimum == "2.28"
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.4")
    monkeypatch.setenv("CONDA_OVERRIDE_GLIBC", "2.17")
    with pytest.raises(PreflightError) as err:
        preflight(
            Lock.load(path),
            "gpu",
            "linux-64",
            prefix=tmp_path / "p",
            store=Store(tmp_path / "s"),
            sources=[],
            manifest=Manifest.load(manifest),
        )
    text = str(err.value)
    assert "supports CUDA 12.4" in text and "needs 12.9" in text
    assert "this node has glibc 2.17 (CONDA_OVERRIDE_GLIBC); the environment needs 2.28" in text


def test_disk_too_small_fails_with_request_disk(lock, node, monkeypatch):
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.9")
    monkeypatch.setattr(pf, "free_bytes", lambda path: 1000)
    with pytest.raises(PreflightError) as err:
        run(lock, node)
    text = str(err.value)
    assert "only 1000 B free" in text
    assert "2.5 x 4.9 KiB of packages, an estimate" in text
    assert "request_disk = 1GB" in text


def test_disk_estimate_uses_a_known_installed_size(lock, node, monkeypatch):
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.9")
    monkeypatch.setattr(pf, "free_bytes", lambda path: 6000 + 5000 * 2)
    report = run(lock, node, installed_bytes=6000)
    assert {c.name: c.status for c in report.checks}["disk"] == "ok"


def test_free_bytes_is_what_shutil_calls_free(tmp_path):
    import shutil

    assert abs(pf.free_bytes(tmp_path) - shutil.disk_usage(tmp_path).free) < 64 << 20


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_mirror_is_an_error_naming_it(lock, node, monkeypatch):
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.9")
    mirror = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(PreflightError) as err:
        run(lock, node, sources=parse_sources([f"mirror={mirror}"]))
    text = str(err.value)
    assert f"the mirror {mirror} does not answer" in text
    assert "2 artifact(s)" in text and "refused" in text

    report = run(lock, node, sources=parse_sources([f"mirror={mirror}", "upstream"]))
    (check,) = [c for c in report.checks if c.name == "mirror"]
    assert check.status == "warning" and "falling back to upstream" in check.detail


def test_a_mirror_that_answers_passes_and_a_warm_store_asks_nobody(
    lock, node, monkeypatch, tmp_path
):
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.9")
    root = tmp_path / "mirror-root"
    root.mkdir()
    with UpstreamServer(root) as srv:
        sources = parse_sources([f"mirror={srv.url}"])
        report = run(lock, node, sources=sources)
        assert [c.status for c in report.checks if c.name == "mirror"] == ["ok"]
        assert srv.count("/healthz", method="HEAD") == 1

        store = Store(node / "store")
        fill(store, lock)
        srv.reset_log()
        report = run(lock, node, sources=sources, store=store)
        assert [c.status for c in report.checks if c.name == "mirror"] == ["skipped"]
        assert srv.requests == []


def test_missing_platform_and_unknown_environment(lock, node):
    with pytest.raises(PreflightError, match=r"has no platform 'osx-arm64' .*it has: linux-64"):
        preflight(
            lock, "default", "osx-arm64", prefix=node / "p", store=Store(node / "s"), sources=[]
        )
    with pytest.raises(LockError, match="no environment 'nope'"):
        preflight(lock, "nope", "linux-64", prefix=node / "p", store=Store(node / "s"), sources=[])


def test_report_without_raising(lock, node):
    report = run(lock, node, sources=[], raise_on_error=False)
    assert not report.ok and [c.name for c in report.errors] == ["cuda", "mirror"]
    assert "no source is configured" in report.errors[1].detail
    assert "error" in report.summary()
