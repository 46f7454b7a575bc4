"""Small helpers shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from pixicache.model.artifact import Artifact

REPO = Path(__file__).resolve().parent.parent


def artifact_for(data: bytes, url: str = "https://conda.anaconda.org/conda-forge/linux-64/pkg-1.0-0.conda") -> Artifact:
    """An Artifact pinning ``data`` at ``url``."""
    from pixicache.model.artifact import conda_location

    channel, subdir, filename = conda_location(url)
    return Artifact(
        url=url,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        filename=filename,
        kind="conda",
        md5=hashlib.md5(data).hexdigest(),
        channel=channel,
        subdir=subdir,
    )


def run_pixicache(*args: str, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter, as a user would."""
    full_env = dict(os.environ)
    full_env.pop("PIXICACHE_SOURCES", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pixicache", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def run_rattler_script(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run py-rattler code in a child that exits with os._exit (see rattler-notes)."""
    script = textwrap.dedent(code) + "\nimport os, sys\nsys.stdout.flush(); sys.stderr.flush(); os._exit(0)\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)


def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=30)


WHEELHOUSE = Path(
    os.environ.get("PIXICACHE_TEST_WHEELHOUSE", Path.home() / ".cache" / "pixicache-test-wheels")
)
"""Where the pinned wheels of a ``pixicache bundle`` are kept between test runs."""


def pinned_bundle(out: Path):
    """The agent as ``pixicache bundle`` builds it (the pinned wheels for Python >= 3.9 and
    both py-rattler builds, downloaded from PyPI once); skips the test if PyPI cannot be reached."""
    import pytest

    from pixicache.bundle.build import build_bundle

    try:
        return build_bundle(out, source="pypi", wheelhouse=WHEELHOUSE, compresslevel=1)
    except Exception as exc:
        pytest.skip(f"the pinned wheels could not be downloaded from PyPI: {exc}")
