"""The job on a faithful EL9 execute node: python3 is 3.9, several Unix users share one node store.

Each job runs the real ``bootstrap.sh`` in its own sandbox as HTCondor's starter
would, with:

* a ``PATH`` of the system directories in which ``python3`` is a pyenv CPython
  3.9 (EL9's) and no other ``python3.X`` exists, no virtualenv on it; the bundle
  (built from the pinned wheels, as ``pixicache bundle`` does) runs with ``-I``;
* two different non-root uids (``setpriv --reuid/--regid``: no passwd entries
  needed) in one group, sharing one node store set up as the README says
  (``install -d -m 2775 -g GROUP``), each with ``umask 077`` (stricter than any
  site's), so the store's own modes are what makes it work.

Needs root (for the uids) and pyenv's interpreters; each skip says which is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pixicache.bundle.build import BundleInfo
from pixicache.testing import Channel, UpstreamServer, build_channel, demo_channel_specs
from pixicache.testing.condor import (
    as_user,
    node_path,
    pyenv_python,
    starter_environment,
    traversable,
    write_ads,
)
from pixicache.testing.server import mirrored_upstream

from .helpers import pinned_bundle

REPO = Path(__file__).resolve().parent.parent
GROUP = 4321
USERS = (4001, 4002)

MANIFEST = """\
[workspace]
name = "el9-node-test"
channels = ["conda-forge"]
platforms = ["linux-64"]

[dependencies]
hello = "*"

[tasks]
hello = "hello"
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="two Unix users need root (setpriv --reuid)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"),
]


def el9_path(base: Path, python: str) -> str:
    return node_path(base / "usr-bin", python)


@pytest.fixture(scope="module")
def agent_bundle(tmp_path_factory: pytest.TempPathFactory) -> BundleInfo:
    """The agent as the README builds it: the pinned wheels for Python >= 3.9 and both
    py-rattler builds (downloaded from PyPI once into a wheelhouse)."""
    return pinned_bundle(tmp_path_factory.mktemp("pinned-bundle") / "pixicache.pyz")


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Channel:
    """Real conda packages (no python package: the task is a packaged shell program)."""
    return build_channel(tmp_path_factory.mktemp("el9-channel"), demo_channel_specs(None))


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """A directory every test user can reach."""
    root = tmp_path / "node"
    root.mkdir()
    with traversable(root):
        yield root


@pytest.fixture
def mirror(channel: Channel, tmp_path: Path) -> Iterator[tuple[str, UpstreamServer]]:
    with mirrored_upstream(channel.root, tmp_path / "mirror-store") as pair:
        yield pair


def shared_store(base: Path, mode: int = 0o3775) -> Path:
    """The README's node store: ``install -d -m 3775 -g GROUP /var/cache/pixicache``."""
    store = base / "var-cache-pixicache"
    store.mkdir()
    os.chown(store, 0, GROUP)
    store.chmod(mode)
    return store


def sandbox(base: Path, name: str, uid: int, bundle: BundleInfo, lock: Path) -> Path:
    sb = base / "execute" / name
    sb.mkdir(parents=True)
    shutil.copy2(REPO / "bootstrap.sh", sb / "bootstrap.sh")
    shutil.copy2(bundle.path, sb / "pixicache.pyz")
    (sb / "pixi.toml").write_text(MANIFEST)
    shutil.copy2(lock, sb / "pixi.lock")
    write_ads(sb, cluster=77, proc=uid % 100, machine="el9-node")
    home = base / "home" / str(uid)
    home.mkdir(parents=True, exist_ok=True)
    for path in (sb, *sb.rglob("*"), home):
        os.chown(path, uid, GROUP)
    (base / "execute").chmod(0o755)
    return sb


def run_as(uid: int, sb: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        as_user(uid, GROUP, ["./bootstrap.sh"], umask="077"), cwd=sb, env=env,
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def job_env(sb: Path, uid: int, base: Path, path: str, store: Path, mirror: str) -> dict[str, str]:
    env = starter_environment(sb, home=base / "home" / str(uid))
    env.update(
        PATH=path,
        PIXICACHE_CACHE_DIR=str(store),
        PIXICACHE_MIRROR=mirror,
        PIXICACHE_SOURCES=f"mirror={mirror}",
        PIXICACHE_TASK="hello",
    )
    return env


@pytest.mark.parametrize("version", ["3.9", "3.10", "3.13"])
def test_two_users_share_a_node_store_on_an_el9_python(
    version, agent_bundle, channel, mirror, base, tmp_path
):
    python = pyenv_python(version)
    if python is None:
        pytest.skip(f"pyenv has no Python {version} here")
    mirror_url, upstream = mirror
    lock = channel.write_lock(tmp_path / "pixi.lock")
    store = shared_store(base)
    path = el9_path(base, python)
    reports = []
    with traversable(Path(python)):
        for n, uid in enumerate(USERS):
            sb = sandbox(base, f"dir_{n}", uid, agent_bundle, lock)
            proc = run_as(uid, sb, job_env(sb, uid, base, path, store, mirror_url))
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, out
            assert "Traceback" not in out, out
            assert f"python: {python}" in proc.stdout or f"({version})" in proc.stdout, proc.stdout
            assert "hello from" in proc.stdout
            reports.append(json.loads((sb / "out" / "pixicache-report.json").read_text()))
    first, second = reports
    n = len(channel.packages)
    for rep in reports:
        assert rep["installer"]["name"] == "rattler", rep["installer"]
        assert rep["pixi"] is None  # no Pixi was needed, fetched or run
        assert rep["host"]["user"] in (None, "") or isinstance(rep["host"]["user"], str)
    assert first["tiers"]["mirror"]["artifacts"] == n
    assert second["tiers"]["store"]["artifacts"] == n, second["tiers"]
    moved = sum(t["transferred"] for t in second["tiers"].values())
    assert moved == 0, second["tiers"]  # the second user moved 0 bytes
    for p in channel.packages:
        assert upstream.count(f"/{channel.name}/{p.subdir}/{p.filename}") == 1
    # each user has a private area; the shared parts stay usable by the group
    assert sorted(p.name for p in store.glob("user.*")) == sorted(f"user.{u}" for u in USERS)
    for uid in USERS:
        area = (store / f"user.{uid}").stat()
        assert area.st_uid == uid and area.st_mode & 0o777 == 0o700
    # top directories sticky (no member renames another's), fan-out ones not (any member
    # can quarantine a corrupt blob)
    for d in (store / "sha256", store / "locks"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o3775, oct(d.stat().st_mode)
        assert d.stat().st_gid == GROUP
    for d in (store / "sha256").iterdir():
        assert stat.S_IMODE(d.stat().st_mode) == 0o2775, oct(d.stat().st_mode)
    journal = store / "index.sqlite-journal"  # PERSIST: one journal, made with the index
    assert journal.is_file() and not journal.is_symlink()
    assert stat.S_IMODE(journal.stat().st_mode) & 0o060 == 0o060
    for f in (store / "index.sqlite", *(store / "locks").iterdir()):
        assert stat.S_IMODE(f.stat().st_mode) & 0o060 == 0o060, (f, oct(f.stat().st_mode))


def test_python_3_8_is_told_what_it_needs(agent_bundle, channel, mirror, base, tmp_path):
    python = pyenv_python("3.8")
    if python is None:
        pytest.skip("pyenv has no Python 3.8 here")
    lock = channel.write_lock(tmp_path / "pixi.lock")
    store = shared_store(base)
    uid = USERS[0]
    with traversable(Path(python)):
        sb = sandbox(base, "dir_0", uid, agent_bundle, lock)
        proc = run_as(uid, sb, job_env(sb, uid, base, el9_path(base, python), store, mirror[0]))
    assert proc.returncode == 8, proc.stdout + proc.stderr
    assert "no python3 >= 3.9" in proc.stderr and "3.8" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_node_warmed_by_root_with_umask_022_serves_every_user(
    agent_bundle, channel, mirror, base, tmp_path
):
    """root prefetches into the shared store with umask 022; a job user then installs
    from it moving 0 bytes (the store's modes do not depend on root's umask)."""
    python = pyenv_python("3.9")
    if python is None:
        pytest.skip("pyenv has no Python 3.9 here")
    mirror_url, _ = mirror
    lock = channel.write_lock(tmp_path / "pixi.lock")
    store = shared_store(base)
    warm = subprocess.run(
        ["bash", "-c", 'umask 022 && exec "$@"', "warm", sys_python(), "-m", "pixicache",
         "--cache-dir", str(store), "prefetch", str(lock), "--source", f"mirror={mirror_url}",
         "--progress", "none"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert warm.returncode == 0, warm.stderr
    uid = USERS[1]
    with traversable(Path(python)):
        sb = sandbox(base, "dir_0", uid, agent_bundle, lock)
        proc = run_as(uid, sb, job_env(sb, uid, base, el9_path(base, python), store, mirror_url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((sb / "out" / "pixicache-report.json").read_text())
    assert rep["tiers"]["store"]["artifacts"] == len(channel.packages)
    assert sum(t["transferred"] for t in rep["tiers"].values()) == 0


def sys_python() -> str:
    import sys

    return sys.executable


def test_a_store_this_user_cannot_write_is_one_clear_message(channel, mirror, base, tmp_path):
    """A store root made 0755 by root (not shared): another user may still ask what it
    holds (plan, cache info), and an install says which path and what to do (exit 7)."""
    mirror_url, _ = mirror
    lock = channel.write_lock(tmp_path / "pixi.lock")
    store = base / "root-only-store"
    warm = subprocess.run(
        [sys_python(), "-m", "pixicache", "--cache-dir", str(store), "prefetch", str(lock),
         "--source", f"mirror={mirror_url}", "--progress", "none"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert warm.returncode == 0, warm.stderr
    store.chmod(0o755)
    uid = USERS[0]
    (base / "ws").mkdir()
    (base / "ws" / "pixi.toml").write_text(MANIFEST)
    shutil.copy2(lock, base / "ws" / "pixi.lock")
    home = base / "home" / str(uid)
    home.mkdir(parents=True)
    os.chown(base / "ws", uid, GROUP)
    os.chown(home, uid, GROUP)

    def pixicache_as_user(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PIXICACHE_CONFIG": str(home / "none.toml")}
        return subprocess.run(
            as_user(uid, GROUP, [sys_python(), "-m", "pixicache", "--cache-dir", str(store), *args]),
            cwd=base / "ws", env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    with traversable(Path(sys_python()), REPO):
        plan = pixicache_as_user("plan", str(base / "ws" / "pixi.lock"))
        info = pixicache_as_user("cache", "info")
        install = pixicache_as_user("install", "--no-preflight", "--source", f"mirror={mirror_url}")
    assert plan.returncode == 0, plan.stderr
    assert f"{len(channel.packages)} present" in plan.stdout
    assert info.returncode == 0, info.stderr
    assert install.returncode == 7, install.stdout + install.stderr
    assert "Traceback" not in install.stderr
    assert f"uid {uid}" in install.stderr and str(store) in install.stderr
    assert "A store shared by several users" in install.stderr


def test_a_store_root_without_the_sticky_bit_keeps_each_user_s_own_files_elsewhere(
    agent_bundle, channel, mirror, base, tmp_path
):
    """A 2775 root lets any member rename another's entries: the agent then keeps this
    user's own files (unpacked agent, package cache) in a private TMPDIR area, and the
    store only for blobs."""
    python = pyenv_python("3.9")
    if python is None:
        pytest.skip("pyenv has no Python 3.9 here")
    lock = channel.write_lock(tmp_path / "pixi.lock")
    store = shared_store(base, 0o2775)
    uid = USERS[0]
    with traversable(Path(python)):
        sb = sandbox(base, "dir_0", uid, agent_bundle, lock)
        proc = run_as(uid, sb, job_env(sb, uid, base, el9_path(base, python), store, mirror[0]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(store.glob("user.*"))
    area = sb / f"pixicache-{uid}"  # TMPDIR is the sandbox, as HTCondor's starter sets it
    assert (area / "bundle").is_dir() and (area / "pkgs").is_dir()
    assert area.stat().st_mode & 0o777 == 0o700 and area.stat().st_uid == uid
    assert len(list((store / "sha256").rglob("*"))) > 0  # the blobs are shared still
