"""The bundle launcher's guess: start the py-rattler child before the CLI is imported."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("argv", "lock"),
    [
        (["install"], "pixi.lock"),
        (["--cache-dir", "/s", "run", "train", "--installer", "pixi"], "pixi.lock"),  # the task's args
        (["--cache-dir=/s", "install", "--manifest", "ws/pixi.toml"], "ws/pixi.lock"),
        (["run", "-e", "gpu", "--manifest=ws/pixi.toml", "train"], "ws/pixi.lock"),
        (["install", "--installer", "rattler", "--source", "mirror=http://m"], "pixi.lock"),
        (["install", "--installer", "pixi"], None),
        (["install", "--pixi", "/bin/pixi"], None),
        (["run", "--trust-pixi=/bin/pixi", "train"], None),
        (["serve"], None),
        (["install", "--help"], None),
        ([], None),
    ],
)
def test_the_launcher_starts_the_child_only_for_a_rattler_install(
    argv: list[str], lock: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pixicache.agent import ahead
    from pixicache.backends.rattler import probe, process

    (tmp_path / "ws").mkdir()
    for where in (tmp_path, tmp_path / "ws"):
        (where / "pixi.lock").write_text("version: 6\n")
    monkeypatch.chdir(tmp_path)
    started: list[object] = []
    monkeypatch.setattr(process, "start_ahead", lambda path=None: started.append(path) or True)
    monkeypatch.setattr(probe, "rattler_available", lambda: (True, "test"))
    assert ahead.start_from_argv(argv) is (lock is not None)
    assert started == ([] if lock is None else [tmp_path / lock])


def test_a_guess_that_fails_is_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    from pixicache.agent import ahead
    from pixicache.backends.rattler import probe

    def broken() -> tuple[bool, str]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(probe, "rattler_available", broken)
    assert ahead.start_from_argv(["install"]) is False


def test_the_launchers_prewarmed_child_is_ended_when_no_child_is_wanted() -> None:
    """The bundle's launcher starts a child for any command line naming install or run;
    when the guess then says no (here: the Pixi installer), that child is ended at once,
    not left beside the job."""
    from pixicache.agent import ahead
    from pixicache.bundle import runtime

    pid = _spawn_as_the_launcher([sys.executable, "-c", "import sys; sys.stdin.read()"])
    try:
        assert ahead.start_from_argv(["install", "--installer", "pixi"]) is False
        assert runtime.take_prewarmed() is None
        with pytest.raises(ChildProcessError):  # ended and reaped, not left beside the job
            os.waitpid(pid, os.WNOHANG)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def _spawn_as_the_launcher(argv: list[str]) -> int:
    """Start ``argv`` as the bundle's launcher starts its pre-warmed child (``os.posix_spawn``,
    three pipes) and hand it to the runtime as the launcher does; its pid."""
    from pixicache.bundle import runtime

    (r0, w0), (r1, w1), (r2, w2) = os.pipe(), os.pipe(), os.pipe()
    actions = [(os.POSIX_SPAWN_DUP2, r0, 0), (os.POSIX_SPAWN_DUP2, w1, 1), (os.POSIX_SPAWN_DUP2, w2, 2)]
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
    for fd in (r0, w1, w2):
        os.close(fd)
    runtime._PREWARMED.append((pid, w0, r1, r2))
    return pid


def test_the_launchers_child_becomes_a_popen_that_talks_and_ends() -> None:
    """The pre-warmed child, spawned without subprocess, is adopted as a Popen: it gets
    stdin, its stdout and stderr are read, its exit status is seen."""
    from pixicache.bundle import runtime

    code = "import sys; line = sys.stdin.readline(); print(line.upper(), end=''); sys.stderr.write('e'); sys.exit(3)"
    _spawn_as_the_launcher([sys.executable, "-c", code])
    proc = runtime.take_prewarmed()
    assert proc is not None and proc.poll() is None
    assert proc.stdin is not None
    proc.stdin.write("hello\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=30)
    assert (out, err, proc.returncode) == ("HELLO\n", "e", 3)
    assert runtime.take_prewarmed() is None
