"""A shared node store against one of its own users: every path planted as another uid.

The store is set up as the README says (root-owned, group-shared, ``3775``). The
attacker is a member of the group (uid 4101); the victims are another member (uid
4102, running the agent) and root (warming the node, running a node-local ``serve``).
For every path the store and the server write or read, the attacker plants a link (or
a file) there first, pointing at a file only the victim may read or write; the victim's
command must neither read the secret nor write through the link, and must either do the
right thing anyway or stop with a clear message and a documented exit code.

Needs root (``setpriv`` for the uids); each skip says what is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pixicache.serve import ServeConfig, Upstream, start_background
from pixicache.testing import UpstreamServer, build_channel, demo_channel_specs
from pixicache.testing.condor import as_user, traversable

REPO = Path(__file__).resolve().parent.parent
GROUP = 4300
ATTACKER = 4101
VICTIM = 4102

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="planting as another uid needs root (setpriv)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"),
]


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    return build_channel(tmp_path_factory.mktemp("hostile-channel"), demo_channel_specs(None))


@pytest.fixture
def upstream(channel) -> Iterator[UpstreamServer]:
    with UpstreamServer(channel.root) as srv:
        yield srv


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Path]:
    """A directory both users reach, holding the shared store and each user's home."""
    base = tmp_path / "node"
    base.mkdir()
    store = base / "store"
    store.mkdir()
    os.chown(store, 0, GROUP)
    store.chmod(0o3775)
    from pixicache.store import Store

    Store(store)  # the layout, made by root as the README says (`pixicache cache info`)
    for uid in (ATTACKER, VICTIM):
        home = base / f"home-{uid}"
        home.mkdir()
        os.chown(home, uid, GROUP)
        home.chmod(0o700)
    python = Path(sys.executable).resolve()
    with traversable(base, python, REPO):
        yield base


def secret_of(node: Path, uid: int) -> Path:
    """A file only ``uid`` may read and write."""
    path = node / f"home-{uid}" / "secret"
    path.write_bytes(b"the victim's private bytes\n")
    os.chown(path, uid, GROUP)
    path.chmod(0o600)
    return path


def root_secret(node: Path) -> Path:
    path = node / "root-secret"
    path.write_bytes(b"root's private bytes\n")
    path.chmod(0o600)
    return path


def plant(argv: list[str]) -> None:
    """Run ``argv`` as the attacker (a member of the store's group)."""
    subprocess.run(as_user(ATTACKER, GROUP, argv), check=True, capture_output=True, timeout=60)


def run_as(uid: int | None, node: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pixicache", *args]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(node / f"home-{uid}") if uid else str(node),
        "TMPDIR": str(node / f"home-{uid}") if uid else str(node),
        "PYTHONPATH": str(REPO),
    }
    if uid is not None:
        argv = as_user(uid, GROUP, argv, umask="077")
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=node)


def lock_for(channel, upstream, node: Path) -> tuple[Path, list]:
    lock = channel.write_lock(node / "pixi.lock", base_url=upstream.channel_url())
    lock.chmod(0o644)
    from pixicache.model.lockfile import Lock

    return lock, Lock.load(lock).artifacts()


def trap_dir(node: Path, name: str, link_at: Path) -> Path:
    """A world-writable directory of the attacker's, linked at ``link_at`` as the attacker."""
    trap = node / f"home-{ATTACKER}" / name
    plant(["mkdir", "-p", str(trap)])
    plant(["chmod", "777", str(trap)])
    plant(["ln", "-s", str(trap), str(link_at)])
    return trap


def prefetch_as_victim(node: Path, lock: Path) -> subprocess.CompletedProcess[str]:
    return run_as(VICTIM, node, "prefetch", "--cache-dir", str(node / "store"), "--source", "upstream", str(lock))


def blob_path(node: Path, sha: str) -> Path:
    return node / "store" / "sha256" / sha[:2] / sha


# -- the agent's store ---------------------------------------------------------------------


def test_a_link_planted_at_a_blob_path_is_replaced_never_followed(channel, upstream, node):
    lock, arts = lock_for(channel, upstream, node)
    secret = secret_of(node, VICTIM)
    store = node / "store"
    target = arts[0]  # its fan-out directory exists (made with the store), group-writable
    plant(["ln", "-s", str(secret), str(blob_path(node, target.sha256))])
    res = run_as(VICTIM, node, "prefetch", "--cache-dir", str(store), "--source", "upstream", str(lock))
    assert res.returncode == 0, res.stderr
    blob = blob_path(node, target.sha256)
    assert not blob.is_symlink() and stat.S_ISREG(blob.lstat().st_mode)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == target.sha256
    assert secret.read_bytes() == b"the victim's private bytes\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_a_link_planted_as_a_fan_out_directory_stops_the_agent_clearly(channel, upstream, node):
    """A store laid out before the fan-out directories were made up front: a member can
    plant one as a link; the agent refuses it and writes nothing through it."""
    lock, arts = lock_for(channel, upstream, node)
    for a in arts:
        shutil.rmtree(node / "store" / "sha256" / a.sha256[:2], ignore_errors=True)
    elsewhere = node / f"home-{ATTACKER}" / "dir"
    plant(["mkdir", "-p", str(elsewhere)])
    plant(["chmod", "777", str(elsewhere)])
    for a in arts:
        fan = node / "store" / "sha256" / a.sha256[:2]
        if not fan.exists():
            plant(["ln", "-s", str(elsewhere), str(fan)])
    res = prefetch_as_victim(node, lock)
    assert res.returncode == 7, res.stderr
    assert "link" in res.stderr and "Traceback" not in res.stderr
    assert list(elsewhere.iterdir()) == []  # nothing was written through it


def test_a_link_planted_at_a_lock_file_is_never_written_through(channel, upstream, node):
    lock, arts = lock_for(channel, upstream, node)
    secret = secret_of(node, VICTIM)
    plant(["mkdir", "-p", str(node / "store" / "locks")])
    for a in arts:
        plant(["ln", "-s", str(secret), str(node / "store" / "locks" / f"{a.sha256}.lock")])
    res = prefetch_as_victim(node, lock)
    assert res.returncode in (0, 7), res.stderr
    assert "Traceback" not in res.stderr
    if res.returncode == 7:
        assert "lock" in res.stderr
    assert secret.read_bytes() == b"the victim's private bytes\n"


def test_a_link_planted_at_the_index_journal_is_refused(channel, upstream, node):
    lock, _ = lock_for(channel, upstream, node)
    secret = secret_of(node, VICTIM)
    plant(["ln", "-s", str(secret), str(node / "store" / "index.sqlite-journal")])
    res = prefetch_as_victim(node, lock)
    assert res.returncode == 7, res.stderr
    assert "index.sqlite-journal" in res.stderr and "not a regular file" in res.stderr
    assert secret.read_bytes() == b"the victim's private bytes\n"


def test_a_planted_private_area_is_not_used(channel, upstream, node):
    """``user.<uid>`` made (or linked) by someone else is not the victim's own area."""
    lock, _ = lock_for(channel, upstream, node)
    trap = trap_dir(node, "trap", node / "store" / f"user.{VICTIM}")
    res = prefetch_as_victim(node, lock)
    assert res.returncode in (0, 7), res.stderr
    assert "Traceback" not in res.stderr
    assert list(trap.iterdir()) == []  # no partial download, no package cache in there


def test_the_store_top_directories_are_sticky_so_no_member_swaps_them(channel, upstream, node):
    lock, arts = lock_for(channel, upstream, node)
    res = prefetch_as_victim(node, lock)
    assert res.returncode == 0, res.stderr
    fan = node / "store" / "sha256" / arts[0].sha256[:2]
    swap = subprocess.run(
        as_user(ATTACKER, GROUP, ["mv", str(fan), str(fan) + ".moved"]), capture_output=True, timeout=60
    )
    assert swap.returncode != 0  # the sticky sha256/ keeps another member's directory in place
    assert fan.is_dir() and not fan.is_symlink()


# -- a node-local serve over the shared store ---------------------------------------------


def serve_over(node: Path, upstream: UpstreamServer):
    cfg = ServeConfig(
        cache_dir=node / "store", port=0,
        upstreams=[Upstream.make("conda-forge", upstream.channel_url())],
    )  # fmt: skip
    return start_background(cfg)


def test_serve_never_sends_a_planted_link_or_a_changed_blob(channel, upstream, node):
    lock, arts = lock_for(channel, upstream, node)
    assert run_as(None, node, "prefetch", "--cache-dir", str(node / "store"), "--source", "upstream", str(lock)).returncode == 0
    secret = root_secret(node)
    linked, changed = arts[0], arts[1]
    blob = blob_path(node, linked.sha256)
    plant(["rm", "-f", str(blob)])  # the fan-out directory is not sticky: a member may
    plant(["ln", "-s", str(secret), str(blob)])
    with serve_over(node, upstream) as srv, httpx.Client(timeout=30) as client:
        r = client.get(f"{srv.url}/sha256/{linked.sha256}")
        assert r.status_code == 404 and b"private" not in r.content  # a link is no blob
        # another member swaps a blob for a file of its own with other bytes
        target = blob_path(node, changed.sha256)
        plant(["rm", "-f", str(target)])
        plant(["sh", "-c", f"printf 'other bytes' > {target}"])
        url = f"{srv.url}/conda-forge/{changed.subdir}/{changed.filename}"
        got = client.get(url, headers={"x-expected-sha256": changed.sha256})
        assert got.status_code == 200
        assert hashlib.sha256(got.content).hexdigest() == changed.sha256  # refilled, right bytes
    assert secret.read_bytes() == b"root's private bytes\n"


def test_serve_keeps_metadata_out_of_reach_of_the_store_members(channel, upstream, node):
    _lock, arts = lock_for(channel, upstream, node)
    trap = trap_dir(node, "meta", node / "store" / "repodata")
    with serve_over(node, upstream) as srv, httpx.Client(timeout=30) as client:
        sub = arts[0].subdir
        r = client.get(f"{srv.url}/conda-forge/{sub}/repodata.json")
        assert r.status_code == 200 and arts[0].filename in r.text
    assert list(trap.iterdir()) == []


# -- a process that dies while it changes the shared index ---------------------------------

_KILLED_MID_CHANGE = r"""
import os, sys, threading, time
sys.path.insert(0, sys.argv[2])
from pixicache.store import Store
store = Store(sys.argv[1])
inside = threading.Event()

def change():
    # a transaction large enough that SQLite writes pages to the database before commit
    with store.index._change() as conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT OR REPLACE INTO blobs(sha256, size, first_use, last_use) VALUES (?,?,?,?)",
            ((f"{i:064x}", i, 0.0, 0.0) for i in range(200_000)),
        )
        inside.set()
        time.sleep(float(sys.argv[3]))
        conn.execute("COMMIT")

threading.Thread(target=change, daemon=True).start()  # as the fetch's workers are
inside.wait()
if sys.argv[4] == "exit":  # as pixicache.cli.entry ends a process: exit handlers, then _exit
    import atexit
    atexit._run_exitfuncs()
    os._exit(0)
os.kill(os.getpid(), 9)  # killed outright
"""


def _hot(journal: Path) -> bool:
    with open(journal, "rb") as fh:
        return fh.read(1) not in (b"", b"\0")


def test_an_exit_mid_change_waits_for_it_so_no_other_user_is_locked_out(node):
    """A job that ends (an eviction's SIGTERM, an error) while a worker thread is inside
    an index transaction waits for it: the journal is not left hot, and another user's
    job uses the index at once."""
    store = node / "store"
    proc = subprocess.run(
        as_user(ATTACKER, GROUP, [sys.executable, "-c", _KILLED_MID_CHANGE, str(store), str(REPO), "1", "exit"]),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not _hot(store / "index.sqlite-journal")
    res = run_as(VICTIM, node, "cache", "info", "--cache-dir", str(store))
    assert res.returncode == 0, res.stderr


def test_a_journal_left_hot_by_a_killed_process_is_explained(node):
    """Killed outright inside a transaction (SIGKILL), a process leaves the journal hot;
    another user cannot remove the journal (the first user of the index made it) in the
    sticky store: the error says what happened and who can finish it, and root's
    `cache info` does."""
    store = node / "store"
    subprocess.run(
        as_user(ATTACKER, GROUP, [sys.executable, "-c", _KILLED_MID_CHANGE, str(store), str(REPO), "0", "kill"]),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert _hot(store / "index.sqlite-journal")
    res = run_as(VICTIM, node, "cache", "gc", "--cache-dir", str(store), "--max-size", "100G")
    assert res.returncode == 7, res.stderr
    assert "Traceback" not in res.stderr
    assert "killed while it changed the index" in res.stderr
    assert f"only its owner (uid {ATTACKER}) or root" in res.stderr  # it made the journal
    assert "pixicache cache info --cache-dir" in res.stderr
    fixed = run_as(None, node, "cache", "info", "--cache-dir", str(store))  # root
    assert fixed.returncode == 0, fixed.stderr
    again = run_as(VICTIM, node, "cache", "gc", "--cache-dir", str(store), "--max-size", "100G")
    assert again.returncode == 0, again.stderr
