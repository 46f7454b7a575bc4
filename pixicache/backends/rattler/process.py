"""Running :mod:`pixicache.backends.rattler.child` — every call into py-rattler — in a child process.

py-rattler can crash at interpreter exit, so the parent never imports it: it
runs the child script by path (stdlib only, fast to start), reads the one JSON
line it prints, and turns every failure into :class:`~pixicache.errors.InstallError`.
The agent starts the child ahead of need (:func:`start_ahead`), so importing
py-rattler and reading the lock overlap with its own start-up and planning.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pixicache.bundle.runtime import bundle_runtime
from pixicache.errors import InstallError

__all__ = ["CHILD_SCRIPT", "discard_ahead", "run_child", "start_ahead"]

CHILD_SCRIPT = Path(__file__).with_name("child.py")
_TAIL = 30
_AHEAD: list[tuple[subprocess.Popen[str], str | None]] = []  # (child, the lock it read ahead)
_AT_EXIT: list[bool] = []  # discard_ahead is registered with atexit (once)


def _argv(*args: str) -> list[str]:
    # The child is a stdlib-only script: run it by path (no package import to pay for),
    # told where the bundle's py-rattler build is (never through PYTHONPATH). With the
    # bundle's build named, it needs nothing from site-packages: -S skips their .pth
    # files (-I: no user site, no PYTHON* variables of the job's environment).
    runtime = bundle_runtime()
    if runtime and runtime.rattler_dir:
        return [sys.executable, "-I", "-S", str(CHILD_SCRIPT), "--rattler-path", str(runtime.rattler_dir), *args]
    return [sys.executable, str(CHILD_SCRIPT), *args]


def start_ahead(lock: str | os.PathLike[str] | None = None) -> bool:
    """Start the child now, to import py-rattler (and read ``lock``) while this process
    is still planning: the next :func:`run_child` hands it its command instead of
    starting one. A child already waiting for the same lock is kept; one for another
    lock is ended first. A child that gets no command is ended at this process's exit
    (:func:`discard_ahead`, registered with :mod:`atexit`; if this process dies, its
    stdin closes and it ends on its own). Returns whether one is waiting now (``False``: it could not start).
    """
    want = str(Path(lock).absolute()) if lock is not None else None
    if _AHEAD:
        proc, had = _AHEAD[0]
        if proc.poll() is None and had == want:
            return True
        discard_ahead()
    if not _AT_EXIT:
        import atexit

        atexit.register(discard_ahead)  # reaped at exit, not left to end on its own
        _AT_EXIT.append(True)
    extra = ["--lock", want] if want is not None else []
    with contextlib.suppress(OSError):
        _AHEAD.append(
            (
                subprocess.Popen(
                    _argv("wait", *extra),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
                want,
            )
        )
    return bool(_AHEAD)


def discard_ahead() -> None:
    """End the child :func:`start_ahead` started, if no command took it. It holds no
    lock and writes nothing while it waits (it only imports py-rattler and reads the
    lock), so it is killed rather than waited for, and reaped."""
    proc = _AHEAD.pop()[0] if _AHEAD else None
    if proc is None:
        return
    with contextlib.suppress(OSError):
        proc.kill()
    proc.communicate()


def _take_ahead() -> subprocess.Popen[str] | None:
    proc = _AHEAD.pop()[0] if _AHEAD else None
    if proc is not None and proc.poll() is not None:  # it died early: start afresh
        proc.communicate()
        return None
    return proc


def run_child(
    command: str, payload: dict[str, Any], *, timeout: float | None = None
) -> dict[str, Any]:
    """Run the rattler child (``install`` or ``activate``) and return its JSON answer
    (the one :func:`start_ahead` started, if any).

    Raises:
        InstallError: the child failed, crashed or answered nonsense.
    """
    proc = _take_ahead()
    if proc is not None:
        request: str | None = json.dumps({"command": command, "payload": payload}) + "\n"
    else:
        request = None
        proc = subprocess.Popen(
            _argv(command, json.dumps(payload)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    with proc:
        try:
            stdout, stderr = proc.communicate(request, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise InstallError(
                f"py-rattler ({command}) did not finish within {timeout:g} s"
            ) from None
        except BaseException:  # a signal (eviction) or an error here: the child goes too
            proc.kill()
            raise
    answer: dict[str, Any] | None = None
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            answer = json.loads(line)
            break
    if isinstance(answer, dict) and answer.get("ok"):
        return answer
    if isinstance(answer, dict) and answer.get("error"):
        raise InstallError(f"py-rattler {command} failed: {answer['error']}")
    tail = "\n".join((stderr or "").strip().splitlines()[-_TAIL:])
    how = f"exit code {proc.returncode}" if proc.returncode >= 0 else f"signal {-proc.returncode}"
    raise InstallError(
        f"the py-rattler {command} process failed ({how})" + (f":\n{tail}" if tail else "")
    )
