"""The bundle launcher's guess: start the py-rattler child before the CLI is imported."""

from __future__ import annotations

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
    import subprocess
    import sys

    from pixicache.agent import ahead
    from pixicache.bundle import runtime

    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    runtime._PREWARMED.append(proc)
    try:
        assert ahead.start_from_argv(["install", "--installer", "pixi"]) is False
        assert proc.poll() is not None and runtime.take_prewarmed() is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
