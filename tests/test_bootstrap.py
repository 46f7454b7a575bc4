"""bootstrap.sh (the HTCondor job's executable) and the single-file agent (issue 5, 3 and 4).

The job-sandbox tests run bootstrap.sh the way HTCondor's starter does: in a fresh
scratch directory holding only the transferred files (``data/MNIST_data.tar.gz``
arrives flattened, as without ``preserve_relative_paths``), with the job's
environment (``_CONDOR_SCRATCH_DIR``, ``_CONDOR_JOB_AD``, no GPU assigned,
``OMP_NUM_THREADS=1``...), a ``PATH`` without the project's virtualenv, stdout and
stderr in ``_condor_stdout`` / ``_condor_stderr``, and the system python running the
agent in isolated mode. Packages come from a real ``pixicache serve`` mirror in front
of a counting upstream that serves a channel of real conda packages. The CUDA lock
cannot be installed here, so the sandbox gets a test manifest and lock whose ``python``
is a stand-in package wrapping this test interpreter (which has torch), and whose
``train`` task runs the real ``train_mnist.py`` on CPU for a few steps on real MNIST.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pixicache.bundle.build import BundleInfo, build_bundle
from pixicache.bundle.runtime import _rattler_status
from pixicache.testing import Channel, UpstreamServer, build_channel, demo_channel_specs
from pixicache.testing.condor import JOB_PATH, starter_environment, write_ads
from pixicache.testing.condor import job_python as find_job_python
from pixicache.testing.server import mirrored_upstream

from .test_agent import CHECK_AHEAD

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = REPO / "bootstrap.sh"
TRAIN = REPO / "train_mnist.py"
DATA = REPO / "data" / "MNIST_data.tar.gz"
TRAIN_ARGS = (
    "--device cpu --epochs 1 --max-steps 5 --batch-size 64 --train-limit 512 --num-threads 1"
)

TEST_MANIFEST = f"""\
# Test variant of the repo's pixi.toml: same tasks, but a CPU run of a few steps,
# on a channel whose `python` wraps the test interpreter (torch comes from there).
[workspace]
name = "pixicache-mnist-sandbox-test"
channels = ["conda-forge"]
platforms = ["linux-64"]

[dependencies]
python = "*"
hello = "*"

[tasks]
train = "python train_mnist.py {TRAIN_ARGS} --save-model --data-dir data"
hello = "hello"
wait-signal = "python sigwait.py"
"""

SIGWAIT = """\
import os, signal, sys
from pathlib import Path

def on_signal(signum, frame):
    Path("got-signal").write_text(signal.Signals(signum).name)
    sys.exit(128 + signum)

signal.signal(signal.SIGTERM, on_signal)
Path("task-ready").write_text(str(os.getpid()))
while True:
    signal.pause()
"""

# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> BundleInfo:
    """The agent as one file, built once per session from this interpreter's packages
    (offline; the pinned-wheel build needs PyPI)."""
    out = tmp_path_factory.mktemp("bundle") / "pixicache.pyz"
    start = time.perf_counter()
    info = build_bundle(out, source="installed", compresslevel=1)
    print(f"\nbundle: {info.size:,} bytes, built in {time.perf_counter() - start:.1f} s")
    return info


@dataclass
class JobPython:
    path: str
    override: bool  # True: bootstrap must be told (PIXICACHE_PYTHON); False: it finds it on PATH


@pytest.fixture(scope="session")
def job_python(bundle: BundleInfo) -> JobPython:
    """The system python a job would use: python3 on the job's PATH if it is new enough
    for the bundle, else this virtualenv's base interpreter (never the venv itself)."""
    major, minor = (int(v) for v in bundle.min_python.split(".")[:2])
    found = find_job_python((major, minor))
    if found is not None:
        return JobPython(*found)
    pytest.fail(
        f"no interpreter >= {bundle.min_python} outside the virtualenv to run the bundle with"
    )


@pytest.fixture(scope="session")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Channel:
    """Real conda packages: the demo channel, whose `python` wraps this interpreter."""
    return build_channel(tmp_path_factory.mktemp("channel"), demo_channel_specs(sys.executable))


@pytest.fixture(scope="session")
def lock(channel: Channel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return channel.write_lock(tmp_path_factory.mktemp("lock") / "pixi.lock")


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the quick tests let the bundle unpack (once for all of them)."""
    return tmp_path_factory.mktemp("bundle-unpacked")


@dataclass
class Mirror:
    url: str
    upstream: UpstreamServer


@pytest.fixture
def mirror(channel: Channel, tmp_path: Path) -> Iterator[Mirror]:
    """A real `pixicache serve` mirror (cold) in front of a counting upstream."""
    with mirrored_upstream(channel.root, tmp_path / "mirror-store") as (url, upstream):
        yield Mirror(url, upstream)


@pytest.fixture
def static_mirror(channel: Channel, bundle: BundleInfo, tmp_path: Path) -> Iterator[UpstreamServer]:
    """A plain static web server holding the channel and ``agent/pixicache.pyz``."""
    root = tmp_path / "static-mirror"
    shutil.copytree(channel.root, root)
    (root / "agent").mkdir()
    shutil.copy(bundle.path, root / "agent" / "pixicache.pyz")
    with UpstreamServer(root) as srv:
        yield srv


# -- helpers -------------------------------------------------------------------------------


def make_sandbox(
    parent: Path, name: str, bundle: BundleInfo, lock: Path, *, agent: bool = True, proc: int = 0
) -> Path:
    """A scratch dir holding what mnist_gpu.sub transfers (with the test manifest/lock)."""
    sb = parent / name
    sb.mkdir(parents=True)
    shutil.copy2(BOOTSTRAP, sb / "bootstrap.sh")
    if agent:
        shutil.copy2(bundle.path, sb / "pixicache.pyz")
    (sb / "pixi.toml").write_text(TEST_MANIFEST)
    shutil.copy2(lock, sb / "pixi.lock")
    shutil.copy2(TRAIN, sb / "train_mnist.py")
    shutil.copy2(DATA, sb / DATA.name)  # transfer_input_files flattens data/MNIST_data.tar.gz
    (sb / "sigwait.py").write_text(SIGWAIT)
    write_ads(sb, cluster=4242, proc=proc, machine="sandbox-test-node")
    return sb


def job_env(
    sb: Path, python: JobPython, *, store: Path, mirror: str | None, **extra: str
) -> dict[str, str]:
    """The environment HTCondor's starter gives the job (plus the submit file's)."""
    home = sb.parent / "home"
    home.mkdir(exist_ok=True)
    env = starter_environment(sb, home=home)
    env["PIXICACHE_CACHE_DIR"] = str(store)  # what a site sets for its nodes
    if mirror is not None:  # as mnist_gpu.sub's `environment` does
        env["PIXICACHE_MIRROR"] = mirror
        env["PIXICACHE_SOURCES"] = f"mirror={mirror}"
    if python.override:
        env["PIXICACHE_PYTHON"] = python.path
    env.update(extra)
    return env


@dataclass
class Job:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def explain(self) -> str:
        return f"exit {self.rc}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def start_job(sb: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """Start bootstrap.sh with stdout/stderr in the sandbox, as the starter does."""
    out = open(sb / "_condor_stdout", "wb")  # noqa: SIM115 - closed in finish_job
    err = open(sb / "_condor_stderr", "wb")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [str(sb / "bootstrap.sh"), *args],
            cwd=sb,
            env=env,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    finally:
        out.close()
        err.close()
    proc.started = time.perf_counter()  # type: ignore[attr-defined]
    return proc


def finish_job(sb: Path, proc: subprocess.Popen[bytes], timeout: float = 240) -> Job:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return Job(
        rc,
        (sb / "_condor_stdout").read_text(errors="replace"),
        (sb / "_condor_stderr").read_text(errors="replace"),
        time.perf_counter() - proc.started,  # type: ignore[attr-defined]
    )


def run_job(sb: Path, env: dict[str, str], *args: str, timeout: float = 240) -> Job:
    return finish_job(sb, start_job(sb, env, *args), timeout)


def channel_paths(channel: Channel) -> list[str]:
    return [f"/{channel.name}/{p.subdir}/{p.filename}" for p in channel.packages]


def unpacked_parts(home: Path) -> list[str]:
    """What a bundle's unpack dir holds, minus its lock and probe files; a leftover
    temporary tree (``.site.tmp-*``) would show up here."""
    return sorted(
        p.name
        for p in home.iterdir()
        if not p.name.endswith(".lock") and not p.name.startswith("rattler-probe-")
    )


def run_bundle(
    python: str,
    bundle: Path,
    *args: str,
    env: dict[str, str],
    flags: tuple[str, ...] = ("-I", "-S"),
):
    return subprocess.run(
        [python, *flags, str(bundle), *args], capture_output=True, text=True, env=env, timeout=120
    )


# -- bootstrap.sh: static checks ----------------------------------------------------------


def test_bootstrap_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    proc = subprocess.run(
        [shellcheck, "--severity=style", str(BOOTSTRAP)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = BOOTSTRAP.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(BOOTSTRAP, os.X_OK), "bootstrap.sh must be executable (HTCondor runs it as is)"


# -- the bundle ----------------------------------------------------------------------------


def test_bundle_holds_the_agent_and_nothing_else(bundle: BundleInfo) -> None:
    with zipfile.ZipFile(bundle.path) as zf:
        names = set(zf.namelist())
        meta = json.loads(zf.read("pixicache-bundle.json"))
    assert bundle.path.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert {
        "__main__.py",
        "site/pixicache/cli/__init__.py",
        "site/pixicache/agent/pipeline.py",
        "site/httpx/__init__.py",
    } <= names
    assert "site/pixicache/backends/rattler/child.py" in names
    assert any(n.startswith("rattler/cp") and "/rattler/" in n and n.endswith(".so") for n in names)
    tops = {n.split("/")[1] for n in names if n.startswith("site/")}
    assert not tops & {"zstandard", "aiohttp", "pygments", "markdown_it", "torch", "_pytest"}, tops
    assert not any(n.startswith("site/pixicache/testing/") for n in names)
    assert not any(n.endswith((".pyc", ".so")) for n in names if n.startswith("site/"))
    assert meta["build_id"] == bundle.build_id
    assert tuple(b["version"] for b in meta["rattler"]) == bundle.rattler
    assert bundle.packages["pixicache"] == meta["pixicache"]


def test_bundle_build_is_reproducible(bundle: BundleInfo, tmp_path: Path) -> None:
    again = build_bundle(tmp_path / "again.pyz", source="installed", compresslevel=1)
    assert (again.sha256, again.build_id, again.size) == (
        bundle.sha256,
        bundle.build_id,
        bundle.size,
    )


def test_bundle_runs_isolated_with_no_site_packages(
    bundle: BundleInfo, job_python: JobPython, tmp_path: Path
) -> None:
    env = {"PATH": JOB_PATH, "HOME": str(tmp_path), "PIXICACHE_CACHE_DIR": str(tmp_path / "store")}
    first = time.perf_counter()
    proc = run_bundle(job_python.path, bundle.path, "--version", env=env)
    first = time.perf_counter() - first
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(bundle.packages["pixicache"])
    assert f"unpacked bundle {bundle.build_id}" in proc.stderr
    warm = []
    for _ in range(3):
        start = time.perf_counter()
        proc = run_bundle(job_python.path, bundle.path, "--version", env=env)
        warm.append(time.perf_counter() - start)
        assert proc.returncode == 0 and "unpacked" not in proc.stderr, proc.stderr
    print(f"\nbundle: first run (unpack) {first:.2f} s, warm --version {min(warm):.3f} s")

    info = json.loads(run_bundle(job_python.path, bundle.path, "--bundle-info", env=env).stdout)
    home = tmp_path / "store" / "bundle" / bundle.build_id
    assert info["home"] == str(home) and info["build_id"] == bundle.build_id
    assert info["sys_path"][0] == str(home / "site")
    assert not [p for p in info["sys_path"] if "site-packages" in p or "dist-packages" in p], info[
        "sys_path"
    ]
    assert info["rattler"]["ok"], info["rattler"]["reason"]  # CPython >= 3.10 on linux x86_64
    assert (Path(info["rattler"]["dir"]) / "rattler" / "__init__.py").is_file()
    assert Path(info["rattler"]["dir"]).parent == home

    # The agent's commands are there, and run from the unpacked files.
    for command in ("run", "install"):
        proc = run_bundle(job_python.path, bundle.path, command, "--help", env=env)
        assert proc.returncode == 0, proc.stderr
    # -I alone keeps the interpreter's own site dirs, after the bundle's.
    info = json.loads(
        run_bundle(job_python.path, bundle.path, "--bundle-info", env=env, flags=("-I",)).stdout
    )
    assert info["sys_path"][0] == str(home / "site")


def test_an_interpreter_that_writes_no_bytecode_gets_it_written_once(
    bundle: BundleInfo, job_python: JobPython, tmp_path: Path
) -> None:
    """With PYTHONDONTWRITEBYTECODE (or -B) Python would compile every module at every
    start: the bundle writes its bytecode once, into its own unpacked tree."""
    root = tmp_path / "bundles"
    env = {
        "PATH": JOB_PATH,
        "HOME": str(tmp_path),
        "PIXICACHE_BUNDLE_DIR": str(root),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    first = run_bundle(job_python.path, bundle.path, "--version", env=env, flags=("-S",))
    assert first.returncode == 0, first.stderr
    assert "wrote the bundle's bytecode" in first.stderr
    tag = subprocess.run(
        [job_python.path, "-I", "-c", "import sys; print(sys.implementation.cache_tag)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    site = root / bundle.build_id / "site"
    assert (site / f".pixicache-compiled-{tag}").is_file()
    assert list((site / "pixicache" / "cli" / "__pycache__").glob(f"__init__.{tag}.pyc"))
    again = run_bundle(job_python.path, bundle.path, "--version", env=env, flags=("-S",))
    assert again.returncode == 0 and "bytecode" not in again.stderr, again.stderr
    # an interpreter that writes its own bytecode is left to do so lazily
    other = tmp_path / "other"
    env2 = {**env, "PIXICACHE_BUNDLE_DIR": str(other)}
    del env2["PYTHONDONTWRITEBYTECODE"]
    proc = run_bundle(job_python.path, bundle.path, "--version", env=env2, flags=("-S",))
    assert proc.returncode == 0 and "bytecode" not in proc.stderr, proc.stderr
    assert not (other / bundle.build_id / "site" / f".pixicache-compiled-{tag}").exists()


def _processes_of(executable: str) -> list[str]:
    """Command lines of the running processes started as ``executable``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].decode(errors="replace") == executable:
            found.append(" ".join(a.decode(errors="replace") for a in argv))
    return found


def test_a_warm_bundle_start_runs_from_the_unpacked_files_with_a_prewarmed_child(
    bundle: BundleInfo, job_python: JobPython, channel: Channel, lock: Path, tmp_path: Path
) -> None:
    """Once unpacked, the launcher imports only its first step from the zip (every module
    from there is compiled at every start), and an install uses the py-rattler child the
    launcher started before anything else; a command that needs none leaves none behind."""
    python = tmp_path / "job-python"  # a name of its own: its processes can be found
    python.symlink_to(job_python.path)
    store = tmp_path / "store"
    env = {"PATH": JOB_PATH, "HOME": str(tmp_path), "PIXICACHE_CACHE_DIR": str(store)}
    with UpstreamServer(channel.root) as up:
        source = f"mirror={up.url}"
        for name in ("first", "second"):
            ws = tmp_path / name
            ws.mkdir()
            (ws / "pixi.toml").write_text(TEST_MANIFEST)
            shutil.copy2(lock, ws / "pixi.lock")
            proc = subprocess.run(
                [str(python), "-I", "-v", str(bundle.path), "install", "--source", source],
                cwd=ws, env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            report = json.loads((ws / "pixicache-report.json").read_text())
            assert any(
                "started ahead of need (pre-warmed by the launcher" in note
                for note in report["installer"]["notes"]
            ), report["installer"]["notes"]
        # a re-run on the node: its install is a no-op, so the child the launcher
        # pre-warmed is ended before the task starts (the task looks for it)
        ws = tmp_path / "second"
        (ws / "pixi.toml").write_text(
            TEST_MANIFEST.replace("[tasks]\n", '[tasks]\ncheck = "sh ./check.sh"\n', 1)
        )
        (ws / "check.sh").write_text(CHECK_AHEAD)
        rerun = subprocess.run(
            [str(python), "-I", str(bundle.path), "run", "--source", source, "check"],
            cwd=ws, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "checked" in rerun.stdout and "AHEAD-ALIVE" not in rerun.stdout, rerun.stdout
        from_zip = {
            line.split("'")[1] for line in proc.stderr.splitlines()
            if line.startswith("import 'pixicache") and "zipimporter" in line
        }  # fmt: skip
        # the second (warm) start: only the launcher's first step came from the zip
        launcher = {"pixicache", "pixicache.bundle", "pixicache.bundle.launch", "pixicache.userarea"}
        assert from_zip == launcher, from_zip
        # `install --installer pixi` looks like an install to the launcher: it starts the
        # child, and the agent ends it (no Pixi here: the install fails, as it should)
        proc = subprocess.run(
            [str(python), "-I", str(bundle.path), "install", "--installer", "pixi",
             "--source", source],
            cwd=tmp_path / "second", env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert _processes_of(str(python)) == []


def test_a_bundle_area_that_is_not_private_is_never_imported_from(
    bundle: BundleInfo, job_python: JobPython, tmp_path: Path
) -> None:
    """An unpacked tree planted where this user's area should be, in a shared store whose
    ``user.<uid>`` another could write to, is not imported from, not even on the
    launcher's warm path: the bundle unpacks into a private temporary directory."""
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o3777)  # shared: sticky, world-writable
    area = store / f"user.{os.getuid()}"
    planted = area / "bundle" / bundle.build_id / "site"
    (planted / "pixicache").mkdir(parents=True)
    pwned = tmp_path / "pwned"
    (planted / "pixicache" / "__init__.py").write_text(
        f"open({str(pwned)!r}, 'w').write('planted code ran')\n"
    )
    (planted / ".pixicache-unpacked").write_text("{}")
    area.chmod(0o777)  # writable by anyone: not this user's alone
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {
        "PATH": JOB_PATH, "HOME": str(tmp_path), "PIXICACHE_CACHE_DIR": str(store),
        "TMPDIR": str(tmp),
    }  # fmt: skip
    proc = run_bundle(job_python.path, bundle.path, "--version", env=env)
    assert proc.returncode == 0, proc.stderr
    assert not pwned.exists()
    assert f"cannot use {area / 'bundle'}" in proc.stderr and str(tmp) in proc.stderr
    again = run_bundle(job_python.path, bundle.path, "--version", env=env)  # warm, from tmp
    assert again.returncode == 0 and not pwned.exists(), again.stderr


def test_bundle_unpacks_once_when_jobs_start_together(
    bundle: BundleInfo, job_python: JobPython, tmp_path: Path
) -> None:
    root = tmp_path / "node-bundles"
    env = {"PATH": JOB_PATH, "HOME": str(tmp_path), "PIXICACHE_BUNDLE_DIR": str(root)}
    procs = [
        subprocess.Popen(
            [job_python.path, "-I", str(bundle.path), "--bundle-info"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(p.communicate(timeout=120), p.returncode) for p in procs]
    for (out, err), rc in results:
        assert rc == 0, err
        assert json.loads(out)["home"] == str(root / bundle.build_id)
    home = root / bundle.build_id
    parts = unpacked_parts(home)
    assert len(parts) == 2 and parts[0].startswith("rattler-cp") and parts[1] == "site", parts
    markers = [json.loads((home / part / ".pixicache-unpacked").read_text()) for part in parts]
    assert all(m["files"] > 0 for m in markers)
    assert (
        sum(err.count("unpacked bundle") for (_, err), _ in results) <= 2
    )  # site and rattler, once each


def test_bundle_refuses_an_old_python_in_plain_words(job_python: JobPython, tmp_path: Path) -> None:
    future = build_bundle(
        tmp_path / "future.pyz", python_tag="3.99", include_rattler=False, source="installed"
    )
    proc = run_bundle(job_python.path, future.path, "--version", env={"PATH": JOB_PATH})
    assert proc.returncode == 8
    assert "this bundle needs Python >= 3.99" in proc.stderr and "Traceback" not in proc.stderr


def test_bundle_without_rattler_says_why(job_python: JobPython, tmp_path: Path) -> None:
    plain = build_bundle(tmp_path / "plain.pyz", include_rattler=False, source="installed")
    env = {"PATH": JOB_PATH, "PIXICACHE_BUNDLE_DIR": str(tmp_path / "b")}
    info = json.loads(run_bundle(job_python.path, plain.path, "--bundle-info", env=env).stdout)
    assert info["rattler"] == {
        "ok": False,
        "reason": "this bundle was built without py-rattler (pixicache bundle --no-rattler)",
        "dir": None,
    }
    assert not any("/rattler-" in p for p in info["sys_path"]), info["sys_path"]


def test_a_rattler_that_cannot_load_is_left_off_and_explained(tmp_path: Path) -> None:
    """The probe runs in a child process; its verdict is cached per interpreter."""
    home = tmp_path / "home"
    pkg = home / "rattler-cp38" / "rattler"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "raise ImportError('libfoo.so.1: cannot open shared object file')\n"
    )
    (home / "rattler-cp38" / ".pixicache-unpacked").write_text("{}")
    meta = {"rattler": [{"tag": "cp38", "version": "0.25.0", "min_python": [3, 8]}]}
    ok, reason, rdir, _ = _rattler_status(str(tmp_path / "unused.pyz"), meta, home)
    assert (ok, rdir) == (False, None)
    assert "cannot be loaded by" in reason and "libfoo.so.1" in reason
    (pkg / "__init__.py").write_text("__version__ = 'fixed'\n")  # the cached verdict stands
    assert _rattler_status(str(tmp_path / "unused.pyz"), meta, home)[:2] == (False, reason)


# -- bootstrap.sh: each way it can fail ---------------------------------------------------


def test_no_python_is_explained(
    bundle: BundleInfo, lock: Path, job_python: JobPython, tmp_path: Path
) -> None:
    old = tmp_path / "bin" / "python3"
    old.parent.mkdir()
    old.write_text("#!/bin/sh\necho '3 6'\n")  # answers like a Python 3.6 would
    old.chmod(0o755)
    sb = make_sandbox(tmp_path, "dir_1", bundle, lock)
    job = run_job(
        sb,
        job_env(sb, job_python, store=tmp_path / "store", mirror=None, PIXICACHE_PYTHON=str(old)),
    )
    assert job.rc == 8, job.explain()
    assert "this execute node has no python3 >= 3.9" in job.stderr
    assert f"{old}=3.6" in job.stderr


def test_agent_digest_mismatch_is_a_hard_error(
    bundle: BundleInfo, lock: Path, job_python: JobPython, tmp_path: Path
) -> None:
    sb = make_sandbox(tmp_path, "dir_1", bundle, lock)
    wrong = "0" * 64
    env = job_env(
        sb, job_python, store=tmp_path / "store", mirror=None, PIXICACHE_AGENT_SHA256=wrong
    )
    job = run_job(sb, env)
    assert job.rc == 4, job.explain()
    assert bundle.sha256 in job.stderr and wrong in job.stderr
    # the agent never ran: bootstrap.sh's own short report says why
    report = json.loads((sb / "out" / "pixicache-report.json").read_text())
    assert report["command"] == "bootstrap" and report["exit_code"] == 4
    assert wrong in report["error"]["message"]


def test_agent_fetched_from_the_mirror_and_verified(
    bundle: BundleInfo,
    lock: Path,
    job_python: JobPython,
    static_mirror: UpstreamServer,
    bundle_dir: Path,
    tmp_path: Path,
) -> None:
    """No pixicache.pyz transferred: bootstrap fetches $PIXICACHE_MIRROR/agent/pixicache.pyz."""
    sb = make_sandbox(tmp_path, "dir_1", bundle, lock, agent=False)
    env = job_env(
        sb, job_python, store=tmp_path / "store", mirror=static_mirror.url,
        PIXICACHE_AGENT_SHA256=bundle.sha256.upper(), PIXICACHE_TASK="hello", PIXICACHE_BUNDLE_DIR=str(bundle_dir),
    )  # fmt: skip
    job = run_job(sb, env, "from-the-job")
    assert job.rc == 0, job.explain()
    assert f"fetched from {static_mirror.url}/agent/pixicache.pyz" in job.stdout
    assert "verified" in job.stdout and "arg: from-the-job" in job.stdout
    assert static_mirror.count("/agent/pixicache.pyz") == 1

    # Without a digest to check, a fetched agent is refused.
    sb2 = make_sandbox(tmp_path, "dir_2", bundle, lock, agent=False)
    env.pop("PIXICACHE_AGENT_SHA256")
    job = run_job(sb2, env | {"_CONDOR_SCRATCH_DIR": str(sb2)})
    assert job.rc == 4 and "refusing to run an agent fetched from" in job.stderr, job.explain()


def test_unreachable_mirror_is_explained(
    bundle: BundleInfo, lock: Path, job_python: JobPython, bundle_dir: Path, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # The agent cannot be fetched.
    sb = make_sandbox(tmp_path, "dir_1", bundle, lock, agent=False)
    env = job_env(
        sb, job_python, store=tmp_path / "store", mirror=url, PIXICACHE_AGENT_SHA256=bundle.sha256
    )
    job = run_job(sb, env)
    assert job.rc == 3, job.explain()
    assert f"cannot fetch the agent from {url}/agent/pixicache.pyz" in job.stderr
    # The agent was transferred, but the packages cannot be fetched: preflight says so.
    sb = make_sandbox(tmp_path, "dir_2", bundle, lock)
    env = job_env(
        sb, job_python, store=tmp_path / "store", mirror=url, PIXICACHE_BUNDLE_DIR=str(bundle_dir)
    )
    job = run_job(sb, env)
    assert job.rc == 8, job.explain()
    assert f"reason: the mirror {url} does not answer" in job.stdout
    assert "pixicache failed (exit 8): preflight" in job.stderr


CHIRP_STANDIN = """#!/bin/sh
# condor_chirp as the starter provides it: records what the job asks for.
printf '%s\\t%s\\t%s\\n' "$1" "$2" "$3" >> "$CHIRP_RECORD"
"""


def test_a_failed_job_leaves_its_report_and_tells_the_job_ad_why(
    bundle: BundleInfo, lock: Path, job_python: JobPython, bundle_dir: Path, tmp_path: Path
) -> None:
    """No hold for a missing output: out/ exists with the report, the model is absent,
    and the exit code, its source and the agent's message are chirped for the hold reason."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    libexec = tmp_path / "libexec"
    libexec.mkdir()
    (libexec / "condor_chirp").write_text(CHIRP_STANDIN)
    (libexec / "condor_chirp").chmod(0o755)
    record = tmp_path / "chirped.tsv"
    sb = make_sandbox(tmp_path, "dir_1", bundle, lock)
    env = job_env(sb, job_python, store=tmp_path / "store", mirror=url, PIXICACHE_BUNDLE_DIR=str(bundle_dir))
    env.update(PATH=f"{libexec}:{env['PATH']}", _CONDOR_CHIRP_CONFIG=str(sb / ".chirp.config"),
               CHIRP_RECORD=str(record))
    job = run_job(sb, env)
    assert job.rc == 8, job.explain()
    assert sorted(p.name for p in (sb / "out").iterdir()) == ["pixicache-report.json"]
    report = json.loads((sb / "out" / "pixicache-report.json").read_text())
    assert report["exit_code"] == 8 and report["error"]["type"] == "PreflightError"
    calls = [line.split("\t") for line in record.read_text().splitlines()]
    assert all(c[0] == "set_job_attr_delayed" for c in calls)
    chirped = {c[1]: c[2] for c in calls}
    assert chirped["ChirpExitCode"] == "8" and chirped["ChirpExitSource"] == '"agent"'
    assert chirped["ChirpExitReason"].startswith('"preflight failed on ')


def test_task_exit_code_is_passed_through_and_not_mistaken_for_the_agents(
    bundle: BundleInfo,
    lock: Path,
    job_python: JobPython,
    static_mirror: UpstreamServer,
    bundle_dir: Path,
    tmp_path: Path,
) -> None:
    sb = make_sandbox(tmp_path, "dir_1", bundle, lock)
    env = job_env(
        sb, job_python, store=tmp_path / "store", mirror=static_mirror.url,
        PIXICACHE_TASK="hello", PIXICACHE_BUNDLE_DIR=str(bundle_dir),
    )  # fmt: skip
    job = run_job(sb, env, "--exit", "3")  # 3 is also the agent's "fetch failed"
    assert job.rc == 3, job.explain()
    assert "task 'hello' failed with exit code 3" in job.stderr
    assert "pixicache failed" not in job.stderr


def test_sigterm_reaches_the_task_and_its_code_comes_back(
    bundle: BundleInfo,
    lock: Path,
    job_python: JobPython,
    static_mirror: UpstreamServer,
    bundle_dir: Path,
    tmp_path: Path,
) -> None:
    """HTCondor signals the job's main process (bootstrap.sh) on eviction or condor_rm."""
    sb = make_sandbox(tmp_path, "dir_1", bundle, lock)
    env = job_env(
        sb, job_python, store=tmp_path / "store", mirror=static_mirror.url,
        PIXICACHE_TASK="wait-signal", PIXICACHE_BUNDLE_DIR=str(bundle_dir),
    )  # fmt: skip
    proc = start_job(sb, env)
    deadline = time.monotonic() + 120
    while not (sb / "task-ready").exists():
        assert proc.poll() is None, finish_job(sb, proc).explain()
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    job = finish_job(sb, proc, timeout=60)
    assert job.rc == 128 + signal.SIGTERM, job.explain()
    assert (sb / "got-signal").read_text() == "SIGTERM"
    assert "forwarding it to the agent" in job.stderr and "stopped by SIGTERM" in job.stderr


# -- acceptance: the job sandbox, one and ten at once ---------------------------------------


def check_outputs(sb: Path, job: Job) -> dict:
    """The job's outputs for transfer: the model and the report."""
    assert job.rc == 0, job.explain()
    model = sb / "out" / "mnist_cnn.pt"
    assert model.is_file() and zipfile.is_zipfile(model), "mnist_cnn.pt is not a torch.save file"
    report = json.loads((sb / "out" / "pixicache-report.json").read_text())
    assert report["exit_code"] == 0 and report["task"]["exit_code"] == 0
    assert report["task"]["name"] == "train"
    assert report["gpus"]["_CONDOR_AssignedGPUs"] in ("", None)
    assert report["tiers"]["upstream"]["artifacts"] == 0
    assert "model saved -> mnist_cnn.pt" in job.stdout
    assert "done: task 'train' finished" in job.stdout
    return report


@pytest.mark.slow
def test_job_sandbox_trains_mnist_through_the_mirror(
    bundle: BundleInfo,
    lock: Path,
    channel: Channel,
    job_python: JobPython,
    mirror: Mirror,
    tmp_path: Path,
) -> None:
    pytest.importorskip(
        "torch", reason="the stand-in python runs train_mnist.py with this interpreter's torch"
    )
    store = tmp_path / "node-store"
    sb = make_sandbox(tmp_path / "execute", "dir_4242", bundle, lock)
    job = run_job(sb, job_env(sb, job_python, store=store, mirror=mirror.url))
    report = check_outputs(sb, job)
    n = len(channel.packages)
    assert report["tiers"]["mirror"]["artifacts"] == n, report["tiers"]
    assert report["tiers"]["mirror"]["transferred"] > 0
    assert report["installer"]["name"] == "rattler", report["installer"]
    for path in channel_paths(channel):
        assert mirror.upstream.count(path) == 1, path
    assert f"python: {job_python.path}" in job.stdout
    assert (
        "transferred with the job" in job.stdout
        and "data: unpacked MNIST_data.tar.gz" in job.stdout
    )
    assert (sb / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert (store / "bundle" / bundle.build_id / "site").is_dir()  # unpacked into the node store
    print(f"\njob sandbox: exit 0 in {job.seconds:.1f} s; phases {report['phases']}")


@pytest.mark.slow
def test_ten_job_sandboxes_share_one_node_store(
    bundle: BundleInfo,
    lock: Path,
    channel: Channel,
    job_python: JobPython,
    mirror: Mirror,
    tmp_path: Path,
) -> None:
    """Ten jobs start at once on one node (cold store): each artifact is fetched once."""
    pytest.importorskip(
        "torch", reason="the stand-in python runs train_mnist.py with this interpreter's torch"
    )
    store = tmp_path / "node-store"
    sandboxes = [
        make_sandbox(tmp_path / "execute", f"dir_{i}", bundle, lock, proc=i) for i in range(10)
    ]
    start = time.perf_counter()
    procs = [
        start_job(sb, job_env(sb, job_python, store=store, mirror=mirror.url)) for sb in sandboxes
    ]
    jobs = [finish_job(sb, p, timeout=280) for sb, p in zip(sandboxes, procs)]
    seconds = time.perf_counter() - start
    reports = [check_outputs(sb, job) for sb, job in zip(sandboxes, jobs)]

    n = len(channel.packages)
    from_mirror = sum(r["tiers"]["mirror"]["artifacts"] for r in reports)
    assert from_mirror == n, [r["tiers"] for r in reports]  # once per node, not once per job
    for r in reports:
        assert r["tiers"]["mirror"]["artifacts"] + r["tiers"]["store"]["artifacts"] == n, r["tiers"]
    for path in channel_paths(channel):
        assert mirror.upstream.count(path) == 1, path  # and the mirror fetched it once upstream
    parts = unpacked_parts(store / "bundle" / bundle.build_id)
    assert len(parts) == 2 and parts[0].startswith("rattler-cp") and parts[1] == "site", parts
    unpacks = sum(job.stderr.count("unpacked bundle") for job in jobs)
    assert 1 <= unpacks <= 2, unpacks  # site (and rattler), by whichever job came first
    print(
        f"\nten sandboxes: all exit 0 in {seconds:.1f} s ({max(j.seconds for j in jobs):.1f} s slowest)"
    )
