"""Constants and small helpers every part of the pool simulator shares."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent  # benchmarks/pool/common.py -> the repo


BOOTSTRAP = REPO / "bootstrap.sh"


CHANNEL = "conda-forge"


TEMPLATE_BASE = "https://conda.anaconda.org/conda-forge"  # in the cached lock template
PYPI_TEMPLATE_BASE = "http://pypi.pool-upstream.invalid"  # replaced by the upstream's /pypi


TASK = "ready"


TASK_PACKAGE = "pool-task"


STAMP = "pool-task-started"


PHASES = ("cold", "warm-mirror", "warm-nodes", "single", "baseline")


FAULTS = ("mirror-restart", "upstream-down", "corrupt-node-blob", "evict", "mirror-disk-full")


SINGLE_RUNS = 3


_SPAWN_LOCK = threading.Lock()


MANIFEST = f"""\
# The pool benchmark's workspace: the synthetic GPU environment plus `{TASK_PACKAGE}`.
[workspace]
name = "pixicache-pool-benchmark"
channels = ["{CHANNEL}"]
platforms = ["linux-64"]

[dependencies]
{TASK_PACKAGE} = "*"

[tasks]
{TASK} = "{TASK_PACKAGE}"
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g} s")
        time.sleep(0.02)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; ``None`` for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _blobs(store: Path) -> list[Path]:
    root = store / "sha256"
    if not root.is_dir():
        return []
    return [p for sub in root.iterdir() if sub.is_dir() for p in sub.iterdir()]


JOB_UID = 5001
"""The first uid jobs run as with ``--users N`` (N > 1): 5001, 5002..."""
JOB_GID = 5000
"""The group of the job users, which owns the node stores."""


def worker_python(choice: str | None = None) -> tuple[str, bool]:
    """The python3 a job uses: (path, whether bootstrap must be told via PIXICACHE_PYTHON).

    ``choice`` is a path or a version (``"3.9"``: pyenv's); default: the system python3
    if it is >= 3.9, else this interpreter's base (never a virtualenv).
    """
    from pixicache.testing.condor import job_python as find
    from pixicache.testing.condor import pyenv_python

    if choice is not None:
        path = choice if os.sep in choice else pyenv_python(choice)
        if path is None or not os.access(path, os.X_OK):
            raise SystemExit(f"benchmarks/pool: --worker-python {choice}: no such interpreter here")
        return path, True
    found = find((3, 9))
    if found is None:
        raise SystemExit("benchmarks/pool: no python3 >= 3.9 outside a virtualenv to run the jobs with")
    return found


def _wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def _pixicache(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pixicache", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, **(env or {})),
    )
