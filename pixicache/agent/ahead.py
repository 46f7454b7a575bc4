"""Starting the installer's slow part ahead of need.

The rattler installer's child process spends most of a warm install starting Python,
importing py-rattler and reading the lock. Started when the command starts, it does
that on another core while the agent imports its own modules, plans and checks the
store; the install then hands it the request (see
:func:`pixicache.backends.rattler.process.start_ahead`). When the install turns out to
be a no-op or another installer runs, the child is ended before the task starts
(:func:`end_installer_ahead`), or at the agent's exit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pixicache.agent.options import AgentOptions

#: The options of ``install``/``run`` that take a value (so the value is not TASK).
_VALUED = ("--cache-dir", "-e", "--environment", "--platform", "--source", "--jobs", "--report")

__all__ = [
    "end_installer_ahead",
    "prepare_installer_ahead",
    "start_from_argv",
    "start_installer_ahead",
]


def start_installer_ahead(options: AgentOptions, manifest: Path) -> bool:
    """Start the py-rattler child if the rattler installer may run; whether one started.

    It may run when asked for, or for ``auto`` without a Pixi given (a verified Pixi
    already in the store would still win: the child is then unused), and only where
    py-rattler can be used at all. A child the bundle's launcher started on its guess
    (:func:`start_from_argv`) is kept when it read this lock, ended when the rattler
    installer cannot run.
    """
    from pixicache.backends.rattler.process import discard_ahead

    if options.may_use_rattler and _start_for(manifest):
        return True
    discard_ahead()
    return False


def _start_for(manifest: Path) -> bool:
    """Start (or keep) the child for the lock beside ``manifest`` where py-rattler can
    be used; whether one is waiting."""
    from pixicache.backends.rattler.probe import rattler_available
    from pixicache.backends.rattler.process import start_ahead

    if not rattler_available()[0]:
        return False
    lock = manifest.absolute().parent / "pixi.lock"
    return start_ahead(lock if lock.is_file() else None)


def start_from_argv(argv: list[str]) -> bool:
    """The bundle's launcher, before it imports the command line: start the py-rattler
    child now if ``argv`` looks like ``install`` or ``run`` with the rattler installer
    (a guess from the words alone: :func:`start_installer_ahead` decides once the
    options are parsed, and ends a child guessed wrong). The child the launcher
    pre-warmed becomes this one, or is ended here. Whether one started; never raises
    (a guess that fails is no child).
    """
    words = iter(argv)
    agent = not {"--help", "-h"} & set(argv) and _agent_command(words)
    try:
        return agent and _start_from_argv(words)
    except Exception:
        return False
    finally:
        from pixicache.bundle.runtime import drop_prewarmed, resume_collection

        drop_prewarmed()  # the launcher's pre-warmed child, if this guess did not take it
        if not agent:
            resume_collection()  # the agent's own start is collected later


def _agent_command(words: Iterator[str]) -> bool:
    """Whether the command is ``install`` or ``run``, consuming ``words`` up to its name."""
    for word in words:
        if word == "--cache-dir":
            next(words, None)
        elif word in ("install", "run"):
            return True
        elif not word.startswith("--cache-dir="):
            return False
    return False


def _start_from_argv(words: Iterator[str]) -> bool:
    manifest, installer = "pixi.toml", "auto"
    for word in words:
        name, _, value = word.partition("=")
        if name in ("--pixi", "--trust-pixi"):
            return False
        if name in ("--manifest", "--installer"):
            value = value or next(words, "")
            if name == "--manifest":
                manifest = value
            else:
                installer = value
        elif name in _VALUED:
            if not value:
                next(words, None)
        elif not word.startswith("-"):
            break  # run's TASK: what follows is the task's
    return installer in ("auto", "rattler") and _start_for(Path(manifest))


def prepare_installer_ahead(
    lock: Path, environment: str, platform: str, package_cache: Path
) -> bool:
    """Once the plan is made: let the waiting py-rattler child check the package cache
    entries of ``environment`` now, while the agent still checks and fetches (see
    :func:`pixicache.backends.rattler.process.prepare_ahead`); whether it was told."""
    from pixicache.backends.rattler.process import prepare_ahead

    return prepare_ahead(
        {
            "lock": str(lock.absolute()),
            "environment": environment,
            "platform": platform,
            "package_cache": str(package_cache.absolute()),
        }
    )


def end_installer_ahead() -> None:
    """End the child :func:`start_installer_ahead` started if the install did not use
    it (a no-op, or another installer): ``run`` calls this before the task starts."""
    from pixicache.backends.rattler.process import discard_ahead

    discard_ahead()
