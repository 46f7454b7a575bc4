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
from typing import TYPE_CHECKING, Any

from pixicache.bundle.runtime import bundle_runtime, take_prewarmed
from pixicache.errors import InstallError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["PREWARM", "child_argv", "discard_ahead", "prepare_ahead", "run_child", "start_ahead"]

_TAIL = 30
_AHEAD: list[tuple[subprocess.Popen[str], str | None]] = []  # (child, the lock it read ahead)
_AT_EXIT: list[bool] = []  # discard_ahead is registered with atexit (once)
_PREWARMED_PIDS: set[int] = set()  # ahead children that began as the launcher's
_WRITE_AT_ONCE = 16384  # a command this long fits the pipe beside a waiting one: never blocks
_BOOT = (
    "import gc, sys; gc.disable(); sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "sys.path.append(sys.argv[1]); "
    "from pixicache.backends.rattler.child import run; run(sys.argv[2:])"
)
"""The child's ``-c`` program: the tree holding pixicache last on ``sys.path`` (the
working directory never on it), then :func:`pixicache.backends.rattler.child.run`.
Without cyclic garbage collection: the child runs one command and ends
(``os._exit``), and its imports would otherwise trigger collections (~5 ms)."""


PREWARM = (
    "import gc, sys\n"
    "gc.disable()\n"  # as _BOOT
    "if 'ssl' not in sys.modules:\n"
    "    sys.modules['ssl'] = None\n"  # as child.import_asyncio_without_ssl
    "    import asyncio\n"
    "    del sys.modules['ssl']\n"
    "import asyncio, json\n"
    "line = sys.stdin.readline()\n"
    "if line.strip():\n"
    "    spec = json.loads(line)\n"
    "    sys.path.append(spec['tree'])\n"
    "    from pixicache.backends.rattler.child import run\n"
    "    run(spec['argv'])\n"
)
"""The ``-c`` program of the child the bundle's launcher starts before anything else
(``python -I -S -c PREWARM``): it imports asyncio (the largest part of the child's
start, stdlib only; without ``ssl``, as the child does) while the launcher is still
finding its unpacked tree, then reads
one line, ``{"tree": ..., "argv": [...]}``, and becomes the child
(:func:`pixicache.backends.rattler.child.run`); at EOF it ends (nobody needed it).
:func:`start_ahead` hands it that line (:func:`pixicache.bundle.runtime.take_prewarmed`)."""


def _tree() -> str:
    return str(Path(__file__).resolve().parents[3])


def _rattler_args() -> list[str] | None:
    runtime = bundle_runtime()
    if runtime and runtime.rattler_dir:
        return ["--rattler-path", str(runtime.rattler_dir)]
    return None


def child_argv(*args: str) -> list[str]:
    """The command line of the py-rattler child (``args``: its own, e.g. ``wait``).

    It imports :mod:`~pixicache.backends.rattler.child` (stdlib only; its bytecode is
    cached, where a script run by path is compiled at every start) from the tree this
    pixicache runs from. From a bundle it is told where the bundle's py-rattler build
    is (``--rattler-path``, never ``PYTHONPATH``) and needs nothing from site-packages:
    ``-S`` skips their ``.pth`` files, ``-I`` the user site and the job's ``PYTHON*``
    variables. Otherwise it uses this interpreter's environment, as pixicache does.
    """
    rattler = _rattler_args()
    if rattler is not None:
        return [sys.executable, "-I", "-S", "-c", _BOOT, _tree(), *rattler, *args]
    return [sys.executable, "-c", _BOOT, _tree(), *args]


def _prewarmed(*args: str) -> subprocess.Popen[str] | None:
    """The launcher's pre-warmed child (:data:`PREWARM`), told to run as ``args``; ``None``
    when there is none (not a bundle, no usable py-rattler, it died, already taken)."""
    proc = take_prewarmed()
    rattler = _rattler_args()
    if proc is None:
        return None
    if rattler is None or proc.poll() is not None or proc.stdin is None:
        _end(proc)
        return None
    try:
        proc.stdin.write(json.dumps({"tree": _tree(), "argv": [*rattler, *args]}) + "\n")
        proc.stdin.flush()
    except OSError:
        _end(proc)
        return None
    _PREWARMED_PIDS.add(proc.pid)
    return proc


def _end(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()
    proc.communicate()


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
        waiting, had = _AHEAD[0]
        if waiting.poll() is None and had == want:
            return True
        discard_ahead()
    if not _AT_EXIT:
        import atexit

        atexit.register(discard_ahead)  # reaped at exit, not left to end on its own
        _AT_EXIT.append(True)
    extra = ["--lock", want] if want is not None else []
    proc = _prewarmed("wait", *extra)
    if proc is None:
        with contextlib.suppress(OSError):
            proc = subprocess.Popen(
                child_argv("wait", *extra),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
    if proc is not None:
        _AHEAD.append((proc, want))
    return bool(_AHEAD)


def prepare_ahead(payload: dict[str, Any]) -> bool:
    """Tell the child waiting for ``payload["lock"]`` what the coming install links from
    (``lock``, ``environment``, ``platform``, ``package_cache``), so that its cache guard
    checks those entries now (:func:`pixicache.backends.rattler.child.cmd_prepare`);
    whether a child was told. Never raises: a child not told checks at the install."""
    if not _AHEAD:
        return False
    proc, lock = _AHEAD[0]
    if lock != payload.get("lock") or proc.poll() is not None or proc.stdin is None:
        return False
    try:
        proc.stdin.write(json.dumps({"command": "prepare", "payload": payload}) + "\n")
        proc.stdin.flush()
    except (OSError, ValueError):
        return False
    return True


def discard_ahead() -> None:
    """End the child :func:`start_ahead` started, if no command took it. It holds no
    lock and writes nothing while it waits (it only imports py-rattler and reads the
    lock), so it is killed rather than waited for, and reaped."""
    proc = _AHEAD.pop()[0] if _AHEAD else None
    if proc is not None:
        _end(proc)


def _take_ahead() -> subprocess.Popen[str] | None:
    proc = _AHEAD.pop()[0] if _AHEAD else None
    if proc is not None and proc.poll() is not None:  # it died early: start afresh
        proc.communicate()
        return None
    return proc


def run_child(
    command: str,
    payload: dict[str, Any],
    *,
    timeout: float | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the rattler child (``install`` or ``activate``) and return its JSON answer
    (the one :func:`start_ahead` started, if any). ``meanwhile`` runs in this process
    once the child has its command, before its answer is awaited (it must not raise;
    ``timeout`` counts from after it).

    Raises:
        InstallError: the child failed, crashed or answered nonsense.
    """
    proc = _take_ahead()
    prewarmed = proc is not None and proc.pid in _PREWARMED_PIDS
    if proc is not None:
        request: str | None = json.dumps({"command": command, "payload": payload}) + "\n"
    else:
        request = None
        proc = subprocess.Popen(
            child_argv(command, json.dumps(payload)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    with proc:
        try:
            if request is not None and len(request) <= _WRITE_AT_ONCE and proc.stdin:
                with contextlib.suppress(BrokenPipeError):  # it died: communicate says how
                    proc.stdin.write(request)  # the command first: it starts at once
                    proc.stdin.flush()
                request = None
            if meanwhile is not None and request is None:
                meanwhile()
                meanwhile = None
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
    if meanwhile is not None:  # the command was too long to write without waiting
        meanwhile()
    answer: dict[str, Any] | None = None
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            answer = json.loads(line)
            break
    if isinstance(answer, dict) and answer.get("ok"):
        if prewarmed and isinstance(answer.get("ahead"), dict):
            answer["ahead"]["prewarmed"] = True
        return answer
    if isinstance(answer, dict) and answer.get("error"):
        raise InstallError(f"py-rattler {command} failed: {answer['error']}")
    tail = "\n".join((stderr or "").strip().splitlines()[-_TAIL:])
    how = f"exit code {proc.returncode}" if proc.returncode >= 0 else f"signal {-proc.returncode}"
    raise InstallError(
        f"the py-rattler {command} process failed ({how})" + (f":\n{tail}" if tail else "")
    )
