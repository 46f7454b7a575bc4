"""Running :mod:`pixicache.backends.rattler.child` — every call into py-rattler — in a child process.

py-rattler can crash at interpreter exit, so the parent never imports it: it
runs the child script by path (stdlib only, fast to start), reads the one JSON
line it prints, and turns every failure into :class:`~pixicache.errors.InstallError`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pixicache.bundle.runtime import bundle_runtime
from pixicache.errors import InstallError

__all__ = ["CHILD_SCRIPT", "run_child"]

CHILD_SCRIPT = Path(__file__).with_name("child.py")
_TAIL = 30


def run_child(
    command: str, payload: dict[str, Any], *, timeout: float | None = None
) -> dict[str, Any]:
    """Run the rattler child (``install`` or ``activate``) and return its JSON answer.

    Raises:
        InstallError: the child failed, crashed or answered nonsense.
    """
    # The child is a stdlib-only script: run it by path (no package import to pay for),
    # told where the bundle's py-rattler build is (never through PYTHONPATH).
    runtime = bundle_runtime()
    where = ["--rattler-path", str(runtime.rattler_dir)] if runtime and runtime.rattler_dir else []
    argv = [sys.executable, str(CHILD_SCRIPT), *where, command, json.dumps(payload)]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise InstallError(f"py-rattler ({command}) did not finish within {timeout:g} s") from None
    answer: dict[str, Any] | None = None
    for line in reversed(proc.stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            answer = json.loads(line)
            break
    if isinstance(answer, dict) and answer.get("ok"):
        return answer
    if isinstance(answer, dict) and answer.get("error"):
        raise InstallError(f"py-rattler {command} failed: {answer['error']}")
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-_TAIL:])
    how = f"exit code {proc.returncode}" if proc.returncode >= 0 else f"signal {-proc.returncode}"
    raise InstallError(
        f"the py-rattler {command} process failed ({how})" + (f":\n{tail}" if tail else "")
    )
